"""Learning-rate schedules across stages and the AdamW optimizer with per-stage freezing."""

from __future__ import annotations

import re

import jax
import optax
from flax import nnx

from omnijax.config import OptimizerConfig, StageConfig, TrainConfig
from omnijax.sharding import path_str


def stage_schedule(stage: StageConfig) -> optax.Schedule:
  """Warmup (linear from 0) then cosine, warmup-stable-decay or constant, in stage-local steps."""
  end_lr = stage.peak_lr * stage.end_lr_ratio
  warmup = optax.linear_schedule(0.0, stage.peak_lr, max(stage.warmup_steps, 1))
  rest = stage.steps - stage.warmup_steps
  if stage.decay == "cosine":
    main = optax.cosine_decay_schedule(stage.peak_lr, max(rest, 1),
                                       alpha=stage.end_lr_ratio)
  elif stage.decay == "wsd":
    decay_steps = max(int(round(rest * stage.decay_fraction)), 1)
    main = optax.join_schedules(
        [optax.constant_schedule(stage.peak_lr),
         optax.linear_schedule(stage.peak_lr, end_lr, decay_steps)],
        [rest - decay_steps])
  else:
    main = optax.constant_schedule(stage.peak_lr)
  if stage.warmup_steps == 0:
    return main
  return optax.join_schedules([warmup, main], [stage.warmup_steps])


def stage_boundaries(train: TrainConfig) -> list[tuple[str, int, int]]:
  """(name, first global step, end global step) of every stage, in order."""
  out, start = [], 0
  for name, stage in train.ordered_stages:
    out.append((name, start, start + stage.steps))
    start += stage.steps
  return out


def global_schedule(train: TrainConfig) -> optax.Schedule:
  """One schedule over the global step: each stage's schedule restarts at its first step."""
  stages = train.ordered_stages
  schedules = [stage_schedule(stage) for _, stage in stages]
  boundaries = [end for _, _, end in stage_boundaries(train)][:-1]
  return optax.join_schedules(schedules, boundaries)


# The speech encoder's parameters (omnijax.model.transformer's `speech_encoder`).
SPEECH_ENCODER_PARAMS = re.compile("speech_encoder/.*")


def trainable_labels(params: nnx.State, stage: StageConfig) -> nnx.State:
  """'train' or 'frozen' per parameter: trainable when its path full-matches one of the stage's
  `trainable` regexes (e.g. layers/mlp/.*), unless it is the speech encoder's and the stage
  freezes it."""
  compiled = [re.compile(p) for p in stage.trainable]

  def label(path, _):
    name = path_str(path)
    if stage.freeze_speech_encoder and SPEECH_ENCODER_PARAMS.fullmatch(name):
      return "frozen"
    return "train" if any(p.fullmatch(name) for p in compiled) else "frozen"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: OptimizerConfig, labels) -> optax.GradientTransformation:
  """AdamW direction without the learning rate (applied by the step from the global schedule).

  Clipping sees only the trainable gradients; frozen parameters get zero updates and no state.
  """
  adamw = optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.add_decayed_weights(config.weight_decay),
  )
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
