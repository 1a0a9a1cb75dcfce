"""`omnijax train`: runs the configured stages in order, resuming from whatever the workdir holds.

Read top to bottom: `train` takes the workdir; `_train` is the run in a dozen lines (data
checked, progress resumed, then per stage: `enter_stage` builds its program and state, a data
iterator, and `_StepLoop.run` steps it with its hooks: logging, checkpoints, the NaN and SIGTERM
guards). The pieces follow in that order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import signal
import time

import jax
from flax import nnx

from omnijax import processes
from omnijax.config import Config, ConfigError, DataConfig, StageConfig, to_dict
from omnijax.messages import quoted
from omnijax.data import shards
from omnijax.data.pipeline import Batches, mixture_weights
from omnijax.files import atomic_write_text, resolve
from omnijax.model.build import create_model
from omnijax.model.params_io import load_model
from omnijax.sharding import make_mesh
from omnijax.train import flops as flops_lib
from omnijax.train.checkpoints import Checkpoints
from omnijax.train.metrics import MetricsLogger, plot_loss_curves, step_record
from omnijax.train.optimizer import stage_boundaries
from omnijax.train.program import build_train_program
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
  processes.primary_first(lambda: _generate_toyworld_if_missing(config, split_dir))
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
                      cells=toyworld.cells, speech_input=toyworld.speech_input,
                      **_toy_speech_frontend(config))
  print(f"preparing the toy world ({spec.n} scenes) in {config.data.dir} ...", flush=True)
  prepare(config.data.dir, spec)


def _toy_speech_frontend(config: Config) -> dict:
  """The toy world's continuous speech is made for the model's encoder: its fbank bins."""
  if config.toyworld.speech_input == "discrete":
    return {}
  return dict(mel_bins=config.model.speech_encoder.num_mel_bins)


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
    return processes.any_process(self.requested)

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
  if processes.is_primary():
    workdir.mkdir(parents=True, exist_ok=True)
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      busy = e
  # The processes of one run share the workdir under process 0's lock, and refuse together.
  if processes.any_process(busy is not None):
    raise busy or WorkdirBusyError(f"{workdir} is in use by another `omnijax train`")
  try:
    check_same_run(workdir, config)
    return _train(config, workdir, mesh, stages, only_stage, max_steps)
  finally:
    lock.release()


def _train(config: Config, workdir, mesh, stages: list, only_stage: str | None,
           max_steps: int | None) -> dict:
  vocab = check_data(config)
  total_steps = stages[-1][2] if max_steps is None else min(max_steps, stages[-1][2])
  layout = StateLayout.create(config, mesh)
  checkpoints = Checkpoints(workdir / CHECKPOINTS_DIR, config.train.keep_checkpoints)
  progress = resume(config, layout, checkpoints)
  # Written once the checkpoints are known to belong to this config: it describes them.
  if processes.is_primary():
    atomic_write_text(workdir / CONFIG_FILE, config_text(config))
  metrics_log = MetricsLogger(workdir, progress.step, total_steps, enabled=processes.is_primary())
  steps = _StepLoop(config, mesh, checkpoints, metrics_log)
  try:
    for stage_name, stage_end in _stages_to_run(stages, progress, only_stage, max_steps, workdir):
      program = enter_stage(config, stage_name, stage_end, layout, mesh, progress)
      data_config = stage_data_config(config, config.train.stages[stage_name])
      # Closing the iterator stops its worker processes (else they leak shared memory).
      with contextlib.closing(Batches(data_config, vocab, program.batch_sharding)) as data:
        if progress.data_state is not None and progress.stage == stage_name:
          data.set_state(_this_process_state(progress.data_state, data_config, progress.step))
        progress.stage, progress.data_state = stage_name, None
        stage_stop = stage_end if max_steps is None else min(stage_end, max_steps)
        if steps.run(program, data, data_config, progress, stage_stop):
          break
  finally:
    steps.close()
    checkpoints.close()
    metrics_log.close()
  if processes.is_primary():
    plot_loss_curves(workdir)
  print(f"done at step {progress.step}; {steps.describe_utilisation()}", flush=True)
  return {"step": progress.step, "stopped": steps.stopped, "last": steps.last_record}


def check_data(config: Config):
  """The dataset on disk (the toy world made if it is the toy experiment's), its vocabulary and
  shards checked, and every stage's mixture found in it now, not after the earlier stages have
  run. Returns the vocabulary."""
  ensure_data(config)
  vocab = config.model.vocab.build()
  split_dir = pathlib.Path(config.data.dir) / config.data.split
  manifest = shards.load_manifest(split_dir)
  shards.check_vocab(manifest, vocab, str(split_dir / shards.MANIFEST))
  shards.check_speech(manifest, config.model.speech_encoder, str(split_dir / shards.MANIFEST))
  shards.check_shards(split_dir, manifest)
  for name, stage in config.train.ordered_stages:
    mixture_weights(stage_data_config(config, stage), manifest,
                    f"{split_dir} (train.stages.{name}.mixture)")
  return vocab


@dataclasses.dataclass
class Progress:
  """Where the run stands: the global step, the train state (None before the first stage
  builds it), the stage that state belongs to, and a restored data-iterator state that the
  stage it was saved in consumes."""

  step: int = 0
  state: object = None
  stage: str | None = None
  data_state: dict | None = None


def resume(config: Config, layout: StateLayout, checkpoints: Checkpoints) -> Progress:
  """The newest readable checkpoint's progress, or a fresh start."""
  restored = checkpoints.restore_latest(lambda meta: layout.checkpoint_target(config, meta))
  if restored is None:
    return Progress()
  step, state, data_state, meta = restored
  print(f"resumed from {checkpoints.directory}/{step} (stage {meta['stage']})", flush=True)
  # The data iterator must resume exactly too: checked now, before config.yaml is replaced.
  _this_process_state(data_state, stage_data_config(config, config.train.stages[meta["stage"]]),
                      step)
  return Progress(step, state, meta["stage"], data_state)


def _stages_to_run(stages: list, progress: Progress, only_stage: str | None,
                   max_steps: int | None, workdir):
  """(stage name, end step) of each stage still to run, judged as the run goes (`progress` moves
  between stages)."""
  for stage_name, stage_start, stage_end in stages:
    if only_stage is not None and stage_name != only_stage:
      continue
    if max_steps is not None and progress.step >= max_steps:
      return
    if progress.step >= stage_end:
      continue
    if progress.step < stage_start:
      if progress.state is not None:
        raise ConfigError(f"--stage {stage_name} starts at step {stage_start} but the latest "
                          f"checkpoint in {workdir} is at step {progress.step}: run the earlier "
                          "stages first")
      progress.step = stage_start  # a stage run on its own from fresh weights
    yield stage_name, stage_end


def enter_stage(config: Config, stage_name: str, stage_end: int, layout: StateLayout, mesh,
                progress: Progress):
  """The stage's train program; the state initialised, carried from the previous stage's final
  weights, or with its optimizer reset when the stage asks for it."""
  stage = config.train.stages[stage_name]
  program = build_train_program(config, stage_name, mesh=mesh, layout=layout)
  if progress.state is None:
    progress.state = program.init_state(initial_params(config, layout, mesh), progress.step)
  elif progress.stage != stage_name:
    previous = config.train.stages[progress.stage]
    if not stage.carry_optimizer or layout.trainable(previous) != layout.trainable(stage):
      if stage.carry_optimizer:
        log.warning("%s: trainable parameters differ from %s; optimizer state reset",
                    stage_name, progress.stage)
      progress.state = program.init_state(progress.state.params, progress.state.step)
  print(f"stage {stage_name}: steps {progress.step}..{stage_end} "
        f"(mixture {stage.mixture or 'all tasks'})", flush=True)
  return program


class _StepLoop:
  """The step loop and its hooks: metrics every `log_every` steps, a checkpoint every
  `checkpoint_every` steps and at the stage's end, the NaN guard, and SIGTERM (every host
  stops at the same step, after saving)."""

  def __init__(self, config: Config, mesh, checkpoints: Checkpoints, metrics_log: MetricsLogger):
    self.config, self.mesh = config, mesh
    self.checkpoints, self.metrics_log = checkpoints, metrics_log
    self.stop = _StopRequest()
    self.stopped: str | None = None
    self.last_record: dict = {}
    self.peak_flops, self.peak_source = flops_lib.peak_flops_per_device(
        config.train.peak_flops_per_device)
    self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
    self._flops_per_step: dict[tuple[str, bool], float] = {}
    self.run_tokens, self.run_flops, self.run_seconds = 0, 0.0, 0.0

  def run(self, program, data: Batches, data_config: DataConfig, progress: Progress,
          stage_stop: int) -> bool:
    """Steps until `stage_stop`; True when the run must stop (SIGTERM)."""
    train = self.config.train
    window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
    with jax.set_mesh(self.mesh):
      while progress.step < stage_stop:
        batch = next(data)
        progress.state, metrics = program.step(progress.state, batch)
        progress.step += 1
        window_tokens += self.tokens_per_step
        window_flops += self._step_flops(progress.stage, batch)
        self.metrics_log.advance()
        stopping = self.stop.agreed()
        must_save = progress.step % train.checkpoint_every == 0 or progress.step == stage_stop
        if progress.step % train.log_every == 0 or must_save or stopping:
          # Fetching the metrics waits for the steps dispatched so far: time them after it.
          host = jax.device_get(metrics)
          elapsed = time.perf_counter() - window_start
          self._log(host, progress, window_tokens, window_flops, elapsed)
          self.run_tokens, self.run_seconds = self.run_tokens + window_tokens, \
              self.run_seconds + elapsed
          self.run_flops += window_flops
          window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
        if must_save or stopping:
          self._save(progress, data, data_config)
        if stopping:
          self.stopped = "SIGTERM"
          return True
    return False

  def _step_flops(self, stage: str, batch: dict) -> float:
    """Analytic FLOPs of one step: the backbone's, and the speech encoder's and projector's when
    the batch carries speech inputs (whether they train depends on the stage)."""
    key = (stage, "speech_features" in batch)
    if key not in self._flops_per_step:
      speech = (flops_lib.speech_flops_per_row(self.config, self.config.train.stages[stage])
                if key[1] else 0.0)
      self._flops_per_step[key] = self.tokens_per_step * flops_lib.training_flops_per_token(
          self.config.model, self.config.data.seq_len, speech)
    return self._flops_per_step[key]

  def _mfu(self, flops: float, seconds: float) -> float:
    return flops / seconds / (self.peak_flops * self.mesh.devices.size)

  def _log(self, host: dict, progress: Progress, tokens: int, flops: float,
           seconds: float) -> None:
    _check_healthy(host, progress.step, progress.stage, self.checkpoints)
    tokens_per_s = tokens / seconds
    self.last_record = step_record(progress.step, progress.stage, host, tokens_per_s,
                                   self._mfu(flops, seconds))
    self.metrics_log.log(self.last_record)

  def _save(self, progress: Progress, data: Batches, data_config: DataConfig) -> None:
    # Each host reads its own slice of the data, so every host's iterator state is saved.
    data_states = {"fingerprint": _data_fingerprint(data_config),
                   "processes": processes.gather(data.get_state())}
    self.checkpoints.save(progress.step, progress.state, data_states,
                          {"stage": progress.stage, "step": progress.step})

  def describe_utilisation(self) -> str:
    """The run's mean throughput and MFU (model FLOPs / the peak of `peak_source`)."""
    if not self.run_seconds:
      return f"no steps run (peak: {self.peak_source})"
    tokens_per_s = self.run_tokens / self.run_seconds
    mfu = self._mfu(self.run_flops, self.run_seconds)
    return (f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.2%} of "
            f"{self.peak_flops / 1e9:.1f} GFLOP/s per device ({self.peak_source})")

  def close(self) -> None:
    self.stop.restore()
