"""`omnijax train`: runs the configured stages in order, resuming from whatever the workdir holds.

Read top to bottom: mesh and data, model and checkpoints, then one section per stage (optimizer,
state, data iterator, the step loop with logging, checkpoints and the NaN / SIGTERM guards).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import signal
import time

import jax
from flax import nnx

from omnijax.config import Config, ConfigError, DataConfig, StageConfig, quoted, to_dict
from omnijax.data import shards
from omnijax.data.pipeline import Batches, mixture_weights
from omnijax.files import atomic_write_text, resolve
from omnijax.model.build import create_model
from omnijax.model.params_io import load_model
from omnijax import runtime
from omnijax.sharding import make_mesh
from omnijax.train import flops as flops_lib
from omnijax.train.checkpoints import Checkpoints
from omnijax.train.metrics import MetricsLogger, plot_loss_curves, step_record
from omnijax.train.optimizer import stage_boundaries
from omnijax.train.state import StateLayout
from omnijax.train.step import check_batch_fits_mesh
from omnijax.train.workdir import (CHECKPOINTS_DIR, CONFIG_FILE, WorkdirBusyError, WorkdirLock,
                                   check_same_run, config_text)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the last good checkpoint was left untouched."""


def ensure_data(config: Config) -> None:
  """Generates the toy world into data.dir when it holds no dataset and data.dir is the toy
  world's own directory (toyworld.dir, with toyworld.scenes > 0), on process 0 while the others
  wait (a failure there fails every process). Any other data.dir without a dataset is an error:
  a misspelt path must not quietly become a new toy world that training then uses."""
  split_dir = pathlib.Path(config.data.dir) / config.data.split
  runtime.primary_first(lambda: _generate_toyworld_if_missing(config, split_dir))
  if not (split_dir / shards.MANIFEST).exists():
    raise ConfigError(f"data.dir={config.data.dir!r}: process {jax.process_index()} sees no "
                      f"{shards.MANIFEST} under {split_dir}, which process 0 has; on several "
                      "hosts data.dir must be storage every host sees")


def _generate_toyworld_if_missing(config: Config, split_dir: pathlib.Path) -> None:
  if (split_dir / shards.MANIFEST).exists():  # not a regular file: load_manifest names it
    return
  toyworld = config.toyworld
  if toyworld.scenes <= 0 or not toyworld.dir or \
      os.path.normpath(toyworld.dir) != os.path.normpath(config.data.dir):
    raise ConfigError(
        f"data.dir={config.data.dir!r} holds no dataset (no {shards.MANIFEST} in {split_dir}): "
        f"make one with `omnijax prepare toyworld --out {config.data.dir}` or `omnijax prepare "
        f"jsonl FILE... --out {config.data.dir}`, or let train generate the toy world there "
        f"with toyworld.dir={config.data.dir} toyworld.scenes=N")
  from omnijax.data.toyworld.prepare import prepare
  from omnijax.data.toyworld.world import ToyWorldSpec

  vocab = config.model.vocab
  spec = ToyWorldSpec(n=toyworld.scenes, seed=toyworld.seed,
                      text_size=vocab.text_size, n_image_codes=vocab.n_image_codes,
                      n_speech_codes=vocab.n_speech_codes, grid=toyworld.grid,
                      cells=toyworld.cells)
  print(f"preparing the toy world ({spec.n} scenes) in {config.data.dir} ...", flush=True)
  prepare(config.data.dir, spec)


def stage_data_config(config: Config, stage: StageConfig) -> DataConfig:
  if not stage.mixture:
    return config.data
  return dataclasses.replace(config.data, mixture=dict(stage.mixture))


def _data_fingerprint(data_config: DataConfig) -> dict:
  """What decides which batches come, in order (not how fast they come)."""
  fingerprint = to_dict(data_config)
  fingerprint.pop("worker_buffer_size")
  return fingerprint


def _check_healthy(host_metrics: dict, step: int, stage_name: str, checkpoints) -> None:
  values = {"loss": float(host_metrics["loss"]), "grad_norm": float(host_metrics["grad_norm"])}
  if all(math.isfinite(v) for v in values.values()) and bool(host_metrics["params_finite"]):
    return
  raise TrainingDiverged(
      f"training diverged at step {step} (stage {stage_name}): loss {values['loss']}, "
      f"grad_norm {values['grad_norm']}, parameters finite: {bool(host_metrics['params_finite'])}"
      f"; the last good checkpoint in {checkpoints.directory} was kept")


def initial_params(config: Config, layout: StateLayout, mesh) -> dict:
  """Fresh weights (seeded), or `train.init_from`'s (an omnijax model directory, e.g. written by
  `omnijax convert from-hf`), restored directly onto the mesh."""
  if not config.train.init_from:
    model = create_model(config.model, mesh, seed=config.train.seed)
    return nnx.to_pure_dict(nnx.state(model))
  _, model = load_model(config.train.init_from, mesh)
  params = nnx.to_pure_dict(nnx.state(model))
  expected = jax.tree.map(lambda x: (x.shape, str(x.dtype)), layout.abstract_params)
  got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), params)
  if expected != got:
    raise ConfigError(f"train.init_from={quoted(config.train.init_from)}: its parameters do not "
                      "match model.* (compare its model.yaml; scan_layers must match too)")
  return params


def _this_process_state(saved: dict, data_config: DataConfig, step: int) -> dict:
  """This host's data-iterator state, after checking the data would come out the same."""
  if saved["fingerprint"] != _data_fingerprint(data_config):
    changed = sorted(k for k, v in _data_fingerprint(data_config).items()
                     if saved["fingerprint"].get(k) != v)
    raise ConfigError(f"data.{changed[0]} differs from the checkpoint at step {step} "
                      f"({saved['fingerprint'].get(changed[0])!r} then): the data iterator "
                      "cannot resume exactly; restore the setting or start a new workdir")
  if len(saved["processes"]) != jax.process_count():
    raise ConfigError(f"the checkpoint at step {step} holds data state for "
                      f"{len(saved['processes'])} processes, this run has {jax.process_count()}: "
                      "each host's slice of the data would change")
  return saved["processes"][jax.process_index()]


class _StopRequest:
  """SIGTERM (preemption) sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def agreed(self) -> bool:
    """All hosts stop at the same step, so their collective checkpoint save lines up."""
    return runtime.any_process(self.requested)

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train(config: Config, workdir: str | os.PathLike, *, only_stage: str | None = None,
          max_steps: int | None = None) -> dict:
  """Trains; returns {'step', 'stopped', 'last': last logged record}.

  Mistakes in the arguments are refused before the workdir is created; a workdir another run
  holds, or whose checkpoints another config wrote, before anything in it changes.
  """
  if max_steps is not None and max_steps < 1:
    raise ConfigError(f"--max-steps {max_steps}: expected the global step to stop after (>= 1)")
  stages = stage_boundaries(config.train)
  if not stages:
    raise ConfigError("train.stages is empty: configure at least one stage")
  if only_stage is not None:
    only_stage = config.train.resolve_stage(only_stage)
  mesh = make_mesh(config.mesh)
  print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} device(s)",
        flush=True)
  check_batch_fits_mesh(config, mesh)
  workdir = resolve(workdir)  # local or gs://
  lock = WorkdirLock(workdir)
  busy = None
  if runtime.is_primary():
    workdir.mkdir(parents=True, exist_ok=True)
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      busy = e
  # The processes of one run share the workdir under process 0's lock, and refuse together.
  if runtime.any_process(busy is not None):
    raise busy or WorkdirBusyError(f"{workdir} is in use by another `omnijax train`")
  try:
    check_same_run(workdir, config)
    return _train(config, workdir, mesh, stages, only_stage, max_steps)
  finally:
    lock.release()


def _train(config: Config, workdir, mesh, stages: list, only_stage: str | None,
           max_steps: int | None) -> dict:
  train_config = config.train

  ###################### Data on disk ######################
  ensure_data(config)
  vocab = config.model.vocab.build()
  split_dir = pathlib.Path(config.data.dir) / config.data.split
  manifest = shards.load_manifest(split_dir)
  shards.check_vocab(manifest, vocab, str(split_dir / shards.MANIFEST))
  shards.check_shards(split_dir, manifest)
  for name, stage in train_config.ordered_stages:
    # Every stage's mixture must find its tasks now, not after the earlier stages have run.
    mixture_weights(stage_data_config(config, stage), manifest,
                    f"{split_dir} (train.stages.{name}.mixture)")
  total_steps = stages[-1][2] if max_steps is None else min(max_steps, stages[-1][2])

  ###################### Model (abstract), shardings, checkpoints ######################
  layout = StateLayout.create(config, mesh)
  checkpoints = Checkpoints(workdir / CHECKPOINTS_DIR, train_config.keep_checkpoints)
  restored = checkpoints.restore_latest(lambda meta: layout.checkpoint_target(config, meta))
  if restored is None:
    step, state, data_state, meta = 0, None, None, {"stage": None}
  else:
    step, state, data_state, meta = restored
    print(f"resumed from {checkpoints.directory}/{step} (stage {meta['stage']})", flush=True)
    # The data iterator must resume exactly too: checked now, before config.yaml is replaced.
    _this_process_state(data_state, stage_data_config(config, train_config.stages[meta["stage"]]),
                        step)
  # Written once the checkpoints are known to belong to this config: it describes them.
  if runtime.is_primary():
    atomic_write_text(workdir / CONFIG_FILE, config_text(config))

  peak_flops, peak_source = flops_lib.peak_flops_per_device(train_config.peak_flops_per_device)
  flops_per_token = flops_lib.training_flops_per_token(config.model, config.data.seq_len)
  metrics_log = MetricsLogger(workdir, step, total_steps, enabled=runtime.is_primary())
  stop = _StopRequest()
  last_record: dict = {}
  stopped = None
  data = None

  def save(stage_name: str, data: Batches, data_config: DataConfig) -> None:
    # Each host reads its own slice of the data, so every host's iterator state is saved.
    data_states = {"fingerprint": _data_fingerprint(data_config),
                   "processes": runtime.gather(data.get_state())}
    checkpoints.save(step, state, data_states, {"stage": stage_name, "step": step})

  try:
    for stage_name, stage_start, stage_end in stages:
      if only_stage is not None and stage_name != only_stage:
        continue
      if max_steps is not None and step >= max_steps:
        break
      if step >= stage_end:
        continue
      if step < stage_start:
        if state is not None:
          raise ConfigError(f"--stage {stage_name} starts at step {stage_start} but the latest "
                            f"checkpoint in {workdir} is at step {step}: run the earlier "
                            "stages first")
        step = stage_start  # a stage run on its own from fresh weights
      stage = train_config.stages[stage_name]

      ###################### Stage: optimizer and state ######################
      program = runtime.build_train_program(config, stage_name, mesh=mesh, layout=layout)
      if state is None:
        state = program.init_state(initial_params(config, layout, mesh), step)
      elif meta["stage"] != stage_name:
        # Entering a new stage from the previous stage's final weights.
        previous = train_config.stages[meta["stage"]]
        if not stage.carry_optimizer or previous.trainable != stage.trainable:
          if stage.carry_optimizer:
            log.warning("%s: trainable parameters differ from %s; optimizer state reset",
                        stage_name, meta["stage"])
          state = program.init_state(state.params, state.step)
      print(f"stage {stage_name}: steps {step}..{stage_end} "
            f"(mixture {stage.mixture or 'all tasks'})", flush=True)

      ###################### Stage: data ######################
      data_config = stage_data_config(config, stage)
      data = Batches(data_config, vocab, program.batch_sharding)
      if data_state is not None and meta["stage"] == stage_name:
        data.set_state(_this_process_state(data_state, data_config, step))
      meta = {"stage": stage_name}
      data_state = None

      ###################### Stage: steps ######################
      stage_stop = stage_end if max_steps is None else min(stage_end, max_steps)
      window_start, window_tokens = time.perf_counter(), 0
      with jax.set_mesh(mesh):
        while step < stage_stop:
          batch = next(data)
          state, metrics = program.step(state, batch)
          step += 1
          window_tokens += config.data.global_batch_size * config.data.seq_len
          metrics_log.advance()
          stopping = stop.agreed()
          must_save = step % train_config.checkpoint_every == 0 or step == stage_stop
          if step % train_config.log_every == 0 or must_save or stopping:
            host = jax.device_get(metrics)
            _check_healthy(host, step, stage_name, checkpoints)
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            mfu = tokens_per_s * flops_per_token / (peak_flops * mesh.devices.size)
            last_record = step_record(step, stage_name, host, tokens_per_s, mfu)
            metrics_log.log(last_record)
            window_start, window_tokens = time.perf_counter(), 0
          if must_save or stopping:
            save(stage_name, data, data_config)
          if stopping:
            stopped = "SIGTERM"
            break
      data.close()
      data = None
      if stopped:
        break
  finally:
    if data is not None:
      data.close()  # stops grain worker processes
    stop.restore()
    checkpoints.close()
    metrics_log.close()
  if runtime.is_primary():
    plot_loss_curves(workdir)
  print(f"done at step {step}; MFU against {peak_source}: "
        f"{peak_flops / 1e9:.1f} GFLOP/s per device", flush=True)
  return {"step": step, "stopped": stopped, "last": last_record}
