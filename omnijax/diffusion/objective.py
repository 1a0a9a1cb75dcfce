"""The training objective: which response tokens are masked, and the loss on them.

`omni` (reference §3, the release): every supervised response token j draws t_j, u_j ~ U(0, 1);
threshold thr_j = (1 - eps) t_j + eps; token j is masked iff u_j <= thr_j, tail pads
(`<|endoftext|>`) iff u_j <= pad_mask_ratio * thr_j. Unweighted cross-entropy over masked tokens.
`llada`: one t per packed sample (all its response tokens share thr), CE weighted by 1 / thr.
Both: prompt tokens are never masked, every sample with a response gets at least one masked
target, and the Dream shift scores token j with the logits at j - 1.

Randomness is a pure function of (seed, step, global row index), so masks do not depend on the
mesh, the micro-batch split or a restart.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from omnijax.config import ObjectiveConfig
from omnijax.data.tasks import TASKS
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


def _per_segment(values: jax.Array, segment_ids: jax.Array, reduce) -> jax.Array:
  """Reduces [B, L] values over each (row, segment) and broadcasts the result back to [B, L]."""
  batch, length = segment_ids.shape
  flat_ids = (jnp.arange(batch)[:, None] * length + segment_ids).reshape(-1)
  reduced = reduce(values.reshape(-1), flat_ids, num_segments=batch * length)
  return reduced[flat_ids].reshape(batch, length)


def corrupt(batch: dict, config: ObjectiveConfig, vocab: Vocab, seed: int, step: jax.Array,
            row_offset: jax.Array | int = 0) -> Corruption:
  tokens, segment_ids = batch["tokens"], batch["segment_ids"]
  response = (batch["response_mask"] > 0) & (segment_ids > 0)
  length = tokens.shape[1]
  row_ids = row_offset + jnp.arange(tokens.shape[0])
  t, u = _row_uniforms(seed, step, row_ids, length)
  if config.kind == "llada":
    # One t per packed sample: the draw at the sample's first position.
    first = _per_segment(jnp.where(response, jnp.arange(length), length), segment_ids,
                         jax.ops.segment_min)
    t = jnp.take_along_axis(t, jnp.minimum(first, length - 1), axis=1)
  threshold = (1.0 - config.eps) * t + config.eps
  if config.kind == "omni":
    threshold = jnp.where(tokens == vocab.pad_id, config.pad_mask_ratio * threshold, threshold)
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
  weights = (1.0 / threshold) if config.kind == "llada" else jnp.ones_like(threshold)
  return Corruption(inputs=jnp.where(masked, vocab.mask_id, tokens), masked=masked,
                    weights=jnp.where(masked, weights, 0.0).astype(jnp.float32))


def loss_sums(logits: jax.Array, batch: dict, corruption: Corruption,
              config: ObjectiveConfig) -> dict[str, jax.Array]:
  """Sums (not means) so that micro-batches and devices add up exactly.

  The loss is `loss_sum / denominator`: the mean CE over targets for `omni`; for `llada` the
  1/t-weighted CE summed over targets and divided by the number of response tokens (the
  unbiased estimator of the LLaDA bound). `targets` counts targets; per-task
  `task_loss_sum` / `task_targets` [len(TASKS)] give unweighted CE means for reporting.
  """
  # Dream shift: logits at i - 1 score the token at i.
  shifted = logits[:, :-1].astype(jnp.float32)
  targets = batch["tokens"][:, 1:]
  target_mask = corruption.masked[:, 1:]
  log_z = jax.nn.logsumexp(shifted, axis=-1)
  target_logit = jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
  ce = jnp.where(target_mask, log_z - target_logit, 0.0)
  task_one_hot = (batch["task_ids"][:, 1:, None] == jnp.arange(len(TASKS))) & target_mask[..., None]
  n_targets = jnp.sum(target_mask.astype(jnp.float32))
  if config.kind == "llada":
    denominator = jnp.sum(((batch["response_mask"] > 0) & (batch["segment_ids"] > 0))
                          .astype(jnp.float32))
  else:
    denominator = n_targets
  return {
      "loss_sum": jnp.sum(ce * corruption.weights[:, 1:]),
      "denominator": denominator,
      "targets": n_targets,
      "task_loss_sum": jnp.sum(ce[..., None] * task_one_hot, axis=(0, 1)),
      "task_targets": jnp.sum(task_one_hot.astype(jnp.float32), axis=(0, 1)),
  }
