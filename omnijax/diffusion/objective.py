"""The training objectives: which response tokens are targets, their weights, and the loss.

Each objective is one small object in `OBJECTIVES`, chosen by `train.objective.kind`:

`omni` (reference §3, the release): every supervised response token j draws t_j, u_j ~ U(0, 1);
threshold thr_j = (1 - eps) t_j + eps; token j is masked iff u_j <= thr_j, tail pads
(`<|endoftext|>`) iff u_j <= pad_mask_ratio * thr_j. Unweighted cross-entropy over masked tokens.
`llada`: one t per packed sample (all its response tokens share thr), CE weighted by 1 / thr,
summed and divided by the number of response tokens.
Both: t is uniform, or drawn from MaskGIT's cosine schedule (`mask_schedule: cosine`), which
favours nearly fully masked responses (the loss is then a reweighted bound, not LLaDA's own),
for every task or for those named in `task_mask_schedules`; `task_loss_weights` scales the named
tasks' terms of the loss;
prompt tokens are never masked, every sample with a response gets at least one masked target,
and the Dream shift scores token j with the logits at j - 1.
`ar` (the autoregressive baseline on the same backbone): nothing is masked; every response token
(tail pads included, as the diffusion objectives supervise them) is a target of weight 1, scored
by the logits at j - 1 under segment-causal attention: next-token prediction. Mean CE over them.

Randomness is a pure function of (seed, step, global row index), so masks do not depend on the
mesh, the micro-batch split or a restart.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from omnijax.config import MASK_SCHEDULES, OBJECTIVE_KINDS, ConfigError, ObjectiveConfig
from omnijax.data.tasks import TASKS
from omnijax.diffusion.cross_entropy import token_cross_entropy
from omnijax.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class Corruption:
  inputs: jax.Array  # [B, L] tokens with masked positions replaced by <|mask|>
  masked: jax.Array  # [B, L] bool: positions whose original token is a target
  weights: jax.Array  # [B, L] float32 loss weight of each target (1, or 1/t for llada)


def _row_uniforms(seed: int, step: jax.Array, row_ids: jax.Array, length: int):
  """Two independent U(0,1) draws per position, keyed by (seed, step, global row)."""
  step_key = jax.random.fold_in(jax.random.key(seed), step)

  def one_row(row):
    key_t, key_u = jax.random.split(jax.random.fold_in(step_key, row))
    return jax.random.uniform(key_t, (length,)), jax.random.uniform(key_u, (length,))

  return jax.vmap(one_row)(row_ids)


# A uniform draw r -> the masking level t.
_MASK_LEVELS = {"uniform": lambda r: r, "cosine": lambda r: jnp.cos(0.5 * jnp.pi * r)}
assert tuple(_MASK_LEVELS) == MASK_SCHEDULES, (tuple(_MASK_LEVELS), MASK_SCHEDULES)


def _mask_levels(r: jax.Array, task_ids: jax.Array, config: ObjectiveConfig) -> jax.Array:
  """[B, L] masking levels from uniform draws: each position's task's schedule
  (`task_mask_schedules`), `mask_schedule` for the other tasks."""
  levels = _MASK_LEVELS[config.mask_schedule](r)
  for task, schedule in config.task_mask_schedules.items():
    levels = jnp.where(task_ids == TASKS.index(task), _MASK_LEVELS[schedule](r), levels)
  return levels


def _task_loss_factors(task_ids: jax.Array, config: ObjectiveConfig) -> jax.Array:
  """[B, L] each position's task's `task_loss_weights` factor (1 for tasks not named)."""
  factors = jnp.ones(task_ids.shape, jnp.float32)
  for task, weight in config.task_loss_weights.items():
    factors = jnp.where(task_ids == TASKS.index(task), jnp.float32(weight), factors)
  return factors


def _per_segment(values: jax.Array, segment_ids: jax.Array, reduce) -> jax.Array:
  """Reduces [B, L] values over each (row, segment) and broadcasts the result back to [B, L]."""
  batch, length = segment_ids.shape
  flat_ids = (jnp.arange(batch)[:, None] * length + segment_ids).reshape(-1)
  reduced = reduce(values.reshape(-1), flat_ids, num_segments=batch * length)
  return reduced[flat_ids].reshape(batch, length)


def _response(batch: dict) -> jax.Array:
  return (batch["response_mask"] > 0) & (batch["segment_ids"] > 0)


class Objective(abc.ABC):
  """One training objective: from a batch, the model's inputs, the target positions and their
  weights (`corrupt`), and what the summed weighted loss is divided by (`denominator`)."""

  name: str
  causal = False  # whether attention inside a sample is causal (an autoregressive objective)
  decoder = "diffusion"  # how a model trained with it decodes (config.DECODERS)

  @abc.abstractmethod
  def corrupt(self, batch: dict, config: ObjectiveConfig, vocab: Vocab, seed: int,
              step: jax.Array, row_offset: jax.Array | int = 0) -> Corruption:
    """Inputs, targets and weights; randomness keyed by (seed, step, global row)."""

  @abc.abstractmethod
  def denominator(self, batch: dict, targets: jax.Array) -> jax.Array:
    """What the summed, weighted loss is divided by."""


class MaskedDiffusion(Objective):
  """Masked diffusion's common rules: per-position draws keyed by (seed, step, row), at least
  one target per sample, nothing at position 0. Subclasses say how a token's masking
  threshold is drawn and how targets are weighted."""

  @abc.abstractmethod
  def thresholds(self, t: jax.Array, tokens: jax.Array, response: jax.Array,
                 segment_ids: jax.Array, config: ObjectiveConfig, vocab: Vocab) -> jax.Array:
    """[B, L] masking threshold per position (a token is masked iff its draw u <= it)."""

  @abc.abstractmethod
  def target_weights(self, threshold: jax.Array) -> jax.Array:
    """[B, L] loss weight of each target."""

  def corrupt(self, batch: dict, config: ObjectiveConfig, vocab: Vocab, seed: int,
              step: jax.Array, row_offset: jax.Array | int = 0) -> Corruption:
    tokens, segment_ids = batch["tokens"], batch["segment_ids"]
    response = _response(batch)
    length = tokens.shape[1]
    r, u = _row_uniforms(seed, step, row_offset + jnp.arange(tokens.shape[0]), length)
    t = _mask_levels(r, batch["task_ids"], config)
    threshold = self.thresholds(t, tokens, response, segment_ids, config, vocab)
    masked = response & (u <= threshold)
    # At least one target per sample: where none was drawn, mask the response token that came
    # closest (smallest u / threshold).
    closeness = jnp.where(response, u / threshold, jnp.inf)
    closest = closeness == _per_segment(closeness, segment_ids, jax.ops.segment_min)
    has_target = _per_segment(masked.astype(jnp.int32), segment_ids, jax.ops.segment_max) > 0
    masked = masked | (response & closest & ~has_target)
    # Position 0 has no left neighbour to predict it from (Dream shift); data never puts a
    # response there, and this keeps it true for any input.
    masked = masked.at[:, 0].set(False)
    weights = jnp.where(masked, self.target_weights(threshold), 0.0).astype(jnp.float32)
    return Corruption(inputs=jnp.where(masked, vocab.mask_id, tokens), masked=masked,
                      weights=weights)


class OmniMasking(MaskedDiffusion):
  """The release's: a threshold per token, tail pads masked less often, unweighted mean CE."""

  name = "omni"

  def thresholds(self, t, tokens, response, segment_ids, config, vocab):
    threshold = (1.0 - config.eps) * t + config.eps
    return jnp.where(tokens == vocab.pad_id, config.pad_mask_ratio * threshold, threshold)

  def target_weights(self, threshold):
    return jnp.ones_like(threshold)

  def denominator(self, batch, targets):
    return jnp.sum(targets.astype(jnp.float32))


class LladaMasking(MaskedDiffusion):
  """LLaDA's: one threshold per packed sample, CE weighted by 1 / threshold over the number of
  response tokens (the unbiased estimator of the LLaDA bound)."""

  name = "llada"

  def thresholds(self, t, tokens, response, segment_ids, config, vocab):
    length = tokens.shape[1]
    # One t per packed sample: the draw at the sample's first response position.
    first = _per_segment(jnp.where(response, jnp.arange(length), length), segment_ids,
                         jax.ops.segment_min)
    t = jnp.take_along_axis(t, jnp.minimum(first, length - 1), axis=1)
    return (1.0 - config.eps) * t + config.eps

  def target_weights(self, threshold):
    return 1.0 / threshold

  def denominator(self, batch, targets):
    return jnp.sum(_response(batch).astype(jnp.float32))


class NextToken(Objective):
  """Autoregressive: the inputs stay whole, attention is causal inside each sample, and each
  response token is predicted from the hidden state before it (the Dream shift of `loss_sums`),
  which sees only the sample's tokens up to that one. Deterministic: no draws."""

  name = "ar"
  causal = True
  decoder = "ar"

  def corrupt(self, batch, config, vocab, seed, step, row_offset=0):
    segment_ids = batch["segment_ids"]
    # A token is predicted only from its own sample: the position before it must be in the
    # same segment (never true at a row's first column, nor at a packed sample's first token).
    has_left_neighbour = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (1, 0)))
    targets = _response(batch) & has_left_neighbour
    return Corruption(inputs=batch["tokens"], masked=targets,
                      weights=targets.astype(jnp.float32))

  def denominator(self, batch, targets):
    return jnp.sum(targets.astype(jnp.float32))


OBJECTIVES = {objective.name: objective
              for objective in (OmniMasking(), LladaMasking(), NextToken())}
assert tuple(OBJECTIVES) == OBJECTIVE_KINDS, (tuple(OBJECTIVES), OBJECTIVE_KINDS)


def get_objective(kind: str) -> Objective:
  if kind not in OBJECTIVES:
    raise ConfigError(f"train.objective.kind={kind!r}: expected one of {', '.join(OBJECTIVES)}")
  return OBJECTIVES[kind]


def corrupt(batch: dict, config: ObjectiveConfig, vocab: Vocab, seed: int, step: jax.Array,
            row_offset: jax.Array | int = 0) -> Corruption:
  """The inputs, targets and weights of `config.kind`'s objective for one batch."""
  return get_objective(config.kind).corrupt(batch, config, vocab, seed, step, row_offset)


def loss_sums(hidden: jax.Array, head: jax.Array, batch: dict, corruption: Corruption,
              config: ObjectiveConfig) -> dict[str, jax.Array]:
  """Sums (not means) so that micro-batches and devices add up exactly.

  `hidden` [B, L, d] are the model's final hidden states and `head` [d, V] its lm_head
  (`Transformer.hidden_states`, `Transformer.output_head`). The loss is `loss_sum / denominator`,
  each objective saying what it divides by.
  `targets` counts targets; per-task `task_loss_sum` / `task_targets` [len(TASKS)] give
  unweighted CE means for reporting.
  """
  # Dream shift: the hidden state at i - 1 scores the token at i (the last one scores nothing).
  targets = batch["tokens"][:, 1:]
  target_mask = corruption.masked[:, 1:]
  next_tokens = jnp.pad(targets, ((0, 0), (0, 1)))
  ce = token_cross_entropy(hidden, head, next_tokens, config.vocab_chunks)[:, :-1]
  ce = jnp.where(target_mask, ce, 0.0)
  task_one_hot = (batch["task_ids"][:, 1:, None] == jnp.arange(len(TASKS))) & target_mask[..., None]
  n_targets = jnp.sum(target_mask.astype(jnp.float32))
  if config.average == "samples":
    # Each target's weight is divided by its sample's response length, so a sample's loss is a
    # mean over its own response; the shares sum to one per sample: the denominator counts them.
    response = _response(batch)
    share = jnp.where(response, 1.0 / jnp.maximum(_per_segment(
        response.astype(jnp.float32), batch["segment_ids"], jax.ops.segment_sum), 1.0), 0.0)
    weights, denominator = corruption.weights * share, jnp.sum(share)
  else:
    weights = corruption.weights
    denominator = get_objective(config.kind).denominator(batch, corruption.masked)
  if config.task_loss_weights:  # no factors: the step computes exactly what it did before them
    weights = weights * _task_loss_factors(batch["task_ids"], config)
  return {
      "loss_sum": jnp.sum(ce * weights[:, 1:]),
      "denominator": denominator,
      "targets": n_targets,
      "task_loss_sum": jnp.sum(ce[..., None] * task_one_hot, axis=(0, 1)),
      "task_targets": jnp.sum(task_one_hot.astype(jnp.float32), axis=(0, 1)),
  }
