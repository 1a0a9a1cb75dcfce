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
import yaml
from flax import nnx

from omnijax.config import Config, ConfigError, StageConfig, to_dict
from omnijax.data import shards
from omnijax.data.pipeline import Batches
from omnijax.model.build import create_model
from omnijax.sharding import make_mesh
from omnijax.train import flops as flops_lib
from omnijax.train.checkpoints import Checkpoints
from omnijax.train.metrics import MetricsLogger, plot_loss_curves, step_record
from omnijax.train.optimizer import global_schedule, stage_boundaries
from omnijax.train.state import StateLayout
from omnijax.train.step import (TrainState, batch_sharding, check_batch_fits_mesh, jit_train_step,
                                make_train_step)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the last good checkpoint was left untouched."""


def ensure_data(config: Config) -> None:
  """Generates the toy world into data.dir when it is missing and config.toyworld asks for it."""
  split_dir = pathlib.Path(config.data.dir) / config.data.split
  if (split_dir / shards.MANIFEST).is_file():
    return
  if config.toyworld.scenes <= 0:
    raise ConfigError(f"data.dir={config.data.dir!r}: no {shards.MANIFEST} under {split_dir}; "
                      "run `omnijax prepare` or set toyworld.scenes to generate the toy world")
  from omnijax.data.toyworld.prepare import prepare
  from omnijax.data.toyworld.world import ToyWorldSpec

  vocab = config.model.vocab
  spec = ToyWorldSpec(n=config.toyworld.scenes, seed=config.toyworld.seed,
                      text_size=vocab.text_size, n_image_codes=vocab.n_image_codes,
                      n_speech_codes=vocab.n_speech_codes, grid=config.toyworld.grid,
                      cells=config.toyworld.cells)
  print(f"preparing the toy world ({spec.n} scenes) in {config.data.dir} ...", flush=True)
  prepare(config.data.dir, spec)


class _StopRequest:
  """SIGTERM (preemption) sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train(config: Config, workdir: str | os.PathLike, *, only_stage: str | None = None,
          max_steps: int | None = None) -> dict:
  """Trains; returns {'step', 'stopped', 'last': last logged record}."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train_config = config.train

  ###################### Mesh, stages, data on disk ######################
  mesh = make_mesh(config.mesh)
  print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} device(s)",
        flush=True)
  check_batch_fits_mesh(config, mesh)
  stages = stage_boundaries(train_config)
  if not stages:
    raise ConfigError("train.stages is empty: configure at least one stage")
  if only_stage is not None and only_stage not in train_config.stages:
    raise ConfigError(f"--stage {only_stage}: not one of {sorted(train_config.stages)}")
  ensure_data(config)
  schedule = global_schedule(train_config)
  total_steps = stages[-1][2] if max_steps is None else min(max_steps, stages[-1][2])
  (workdir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

  ###################### Model (abstract), shardings, checkpoints ######################
  layout = StateLayout.create(config, mesh)
  graphdef = layout.graphdef

  def abstract_train_state(meta: dict) -> TrainState:
    return layout.abstract_state(layout.optimizer(config, train_config.stages[meta["stage"]]))

  checkpoints = Checkpoints(workdir / "checkpoints", train_config.keep_checkpoints)
  restored = checkpoints.restore_latest(abstract_train_state)
  if restored is None:
    step, state, data_state, meta = 0, None, None, {"stage": None}
  else:
    step, state, data_state, meta = restored
    print(f"resumed from {checkpoints.directory}/{step} (stage {meta['stage']})", flush=True)

  peak_flops, peak_source = flops_lib.peak_flops_per_device(train_config.peak_flops_per_device)
  flops_per_token = flops_lib.training_flops_per_token(config.model, config.data.seq_len)
  metrics_log = MetricsLogger(workdir, step, total_steps)
  stop = _StopRequest()
  last_record: dict = {}
  stopped = None

  def save(stage_name: str, data: Batches) -> None:
    checkpoints.save(step, state, data.get_state(), {"stage": stage_name, "step": step})

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
      tx = layout.optimizer(config, stage)
      shardings = layout.shardings(tx)
      init_opt = jax.jit(tx.init, out_shardings=shardings.opt_state)
      if state is None:
        model = create_model(config.model, mesh, seed=train_config.seed)
        params = nnx.to_pure_dict(nnx.state(model))
        state = TrainState(params, init_opt(params), jax.device_put(step, layout.replicated))
      elif meta["stage"] != stage_name:
        # Entering a new stage from the previous stage's final weights.
        previous = train_config.stages[meta["stage"]]
        if not stage.carry_optimizer or previous.trainable != stage.trainable:
          if stage.carry_optimizer:
            log.warning("%s: trainable parameters differ from %s; optimizer state reset",
                        stage_name, meta["stage"])
          state = TrainState(state.params, init_opt(state.params), state.step)
      print(f"stage {stage_name}: steps {step}..{stage_end} "
            f"(mixture {stage.mixture or 'all tasks'})", flush=True)

      ###################### Stage: data ######################
      data_config = config.data
      if stage.mixture:
        data_config = dataclasses.replace(data_config, mixture=dict(stage.mixture))
      data = Batches(data_config, config.model.vocab.build(), batch_sharding(mesh))
      if data_state is not None and meta["stage"] == stage_name:
        data.set_state(data_state)
      meta = {"stage": stage_name}
      data_state = None

      ###################### Stage: steps ######################
      step_fn = jit_train_step(make_train_step(config, graphdef, tx, schedule), shardings, mesh)
      stage_stop = stage_end if max_steps is None else min(stage_end, max_steps)
      window_start, window_tokens = time.perf_counter(), 0
      with jax.set_mesh(mesh):
        while step < stage_stop:
          batch = next(data)
          state, metrics = step_fn(state, batch)
          step += 1
          window_tokens += config.data.global_batch_size * config.data.seq_len
          metrics_log.advance()
          must_save = step % train_config.checkpoint_every == 0 or step == stage_stop
          if step % train_config.log_every == 0 or must_save or stop.requested:
            host = jax.device_get(metrics)
            if not math.isfinite(float(host["loss"])):
              raise TrainingDiverged(
                  f"loss is {float(host['loss'])} at step {step} (stage {stage_name}); the last "
                  f"good checkpoint in {checkpoints.directory} was kept")
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            mfu = tokens_per_s * flops_per_token / (peak_flops * mesh.devices.size)
            last_record = step_record(step, stage_name, host, tokens_per_s, mfu)
            metrics_log.log(last_record)
            window_start, window_tokens = time.perf_counter(), 0
          if must_save or stop.requested:
            save(stage_name, data)
          if stop.requested:
            stopped = "SIGTERM"
            break
      data.close()
      if stopped:
        break
  finally:
    stop.restore()
    checkpoints.close()
    metrics_log.close()
  plot_loss_curves(workdir)
  print(f"done at step {step}; MFU against {peak_source}: "
        f"{peak_flops / 1e9:.1f} GFLOP/s per device", flush=True)
  return {"step": step, "stopped": stopped, "last": last_record}
