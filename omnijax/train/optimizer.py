"""Learning-rate schedules across stages and the optimizer (AdamW or Muon) with per-stage
freezing."""

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


# Muon's momentum (Keller Jordan's and optax's default), and the RMS its orthogonalised updates
# are scaled to: Moonlight's 0.2, about AdamW's own update RMS, so one learning rate serves both.
MUON_MOMENTUM, MUON_UPDATE_RMS = 0.95, 0.2


def muon_dimensions(params) -> object:
  """Per parameter: the (reduction, output) axes Muon orthogonalises over, None for AdamW.

  Projection kernels are [in, out], or [layers, in, out] when the layers are scanned (the
  leading axis is then a batch of matrices); embeddings and lm_head are lookups and a readout,
  not hidden matrices, and stay on AdamW as in Muon's own recipe."""
  def dimensions(path, leaf):
    name = path_str(path)
    if name.rsplit("/", 1)[-1] == "kernel" and leaf.ndim in (2, 3):
      return optax.contrib.MuonDimensionNumbers(leaf.ndim - 2, leaf.ndim - 1)
    return None

  return jax.tree_util.tree_map_with_path(dimensions, params)


def moment_buffers(config: OptimizerConfig, params) -> object:
  """Per parameter, how many parameter-sized buffers the optimizer keeps for it when it is
  trained: AdamW's two moments, or Muon's one momentum for the matrices it orthogonalises."""
  if config.kind != "muon":
    return jax.tree.map(lambda _: 2, params)
  return jax.tree.map(lambda leaf, dimensions: 2 if dimensions is None else 1, params,
                      muon_dimensions(params), is_leaf=lambda x: x is None)


def make_optimizer(config: OptimizerConfig, labels) -> optax.GradientTransformation:
  """The optimizer's direction without the learning rate (applied by the step from the global
  schedule).

  Clipping sees only the trainable gradients; frozen parameters get zero updates and no state.
  """
  if config.kind == "muon":
    # optax's muon with a unit rate returns -direction (it applies the rate's sign flip).
    direction = optax.chain(
        optax.contrib.muon(1.0, beta=MUON_MOMENTUM, eps=config.eps,
                           weight_decay=config.weight_decay, adam_b1=config.b1,
                           adam_b2=config.b2, adam_weight_decay=config.weight_decay,
                           muon_weight_dimension_numbers=muon_dimensions,
                           consistent_rms=MUON_UPDATE_RMS),
        optax.scale(-1.0))
  else:
    direction = optax.chain(
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        optax.add_decayed_weights(config.weight_decay))
  trained = optax.chain(optax.clip_by_global_norm(config.clip_norm), direction)
  return optax.multi_transform({"train": trained, "frozen": optax.set_to_zero()}, labels)
