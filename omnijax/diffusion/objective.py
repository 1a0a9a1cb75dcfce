"""The training objective: which response tokens are masked, and the loss on them.

`omni` (reference §3, the release): every supervised response token j draws t_j, u_j ~ U(0, 1);
threshold thr_j = (1 - eps) t_j + eps; token j is masked iff u_j <= thr_j, tail pads
(`<|endoftext|>`) iff u_j <= pad_mask_ratio * thr_j. Unweighted cross-entropy over masked tokens.
`llada`: one t per packed sample (all its response tokens share thr), CE weighted by 1 / thr.
Both: prompt tokens are never masked, every sample with a response gets at least one masked
target, and the Dream shift scores token j with the logits at j - 1.

Randomness is a pure function of (seed, step, global row index), so masks do not depend on the
mesh, the micro-batch split or a restart.

The cross-entropy never materialises the [tokens, vocab] fp32 logits (2 GiB per chip for omni7b at
3072 tokens, and as much again for their gradient): `token_cross_entropy` applies the lm_head and
the log-sum-exp `logits_chunk_len` positions at a time under lax.scan, and its custom gradient
recomputes each chunk's logits in the backward pass (MaxText's vocabulary tiling, over positions
so that the batch sharding of the hidden states is kept).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from omnijax.config import ObjectiveConfig
from omnijax.data.tasks import TASKS
from omnijax.model.transformer import output_logits
from omnijax.sharding import constrain
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


def _split_positions(x: jax.Array, chunk_len: int) -> jax.Array:
  """[B, L, ...] -> [L / chunk_len, B, chunk_len, ...] (chunks first, for lax.scan)."""
  batch, length = x.shape[:2]
  return jnp.swapaxes(x.reshape(batch, length // chunk_len, chunk_len, *x.shape[2:]), 0, 1)


def _merge_positions(x: jax.Array) -> jax.Array:
  """Inverse of `_split_positions`."""
  chunks, batch, chunk_len = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape(batch, chunks * chunk_len, *x.shape[3:])


def _chunk_logits(hidden_chunk: jax.Array, head: jax.Array) -> tuple[jax.Array, jax.Array]:
  """fp32 logits of one chunk and their log-sum-exp (the model's logits, cast as the loss did)."""
  logits = output_logits(hidden_chunk, head).astype(jnp.float32)
  return logits, jax.nn.logsumexp(logits, axis=-1)


def _is_target(logits: jax.Array, targets: jax.Array) -> jax.Array:
  # A comparison with the vocabulary iota (not a gather) stays local to each vocabulary shard.
  return jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                   chunk_len: int) -> jax.Array:
  return _cross_entropy_forward(hidden, head, targets, chunk_len)[0]


def _cross_entropy_forward(hidden, head, targets, chunk_len):
  def chunk(_, inputs):
    hidden_chunk, target_chunk = inputs
    logits, log_z = _chunk_logits(hidden_chunk, head)
    target_logit = jnp.sum(jnp.where(_is_target(logits, target_chunk), logits, 0.0), axis=-1)
    return None, (log_z - target_logit, log_z)

  _, (ce, log_z) = jax.lax.scan(chunk, None, (_split_positions(hidden, chunk_len),
                                              _split_positions(targets, chunk_len)))
  return _merge_positions(ce), (hidden, head, targets, _merge_positions(log_z))


def _cross_entropy_backward(chunk_len, residuals, ce_grad):
  """d ce / d logits = softmax - one_hot, applied to the lm_head chunk by chunk."""
  hidden, head, targets, log_z = residuals
  compute_head = head.astype(hidden.dtype)

  def chunk(head_grad, inputs):
    hidden_chunk, target_chunk, log_z_chunk, grad_chunk = inputs
    logits, _ = _chunk_logits(hidden_chunk, head)
    probs = jnp.exp(logits - log_z_chunk[..., None])
    logits_grad = (grad_chunk[..., None] * (probs - _is_target(logits, target_chunk))
                   ).astype(hidden.dtype)
    hidden_grad = jnp.einsum("bcv,dv->bcd", logits_grad, compute_head)
    # Accumulated in fp32 and kept sharded like the lm_head (replicated it would be 2.5 GiB).
    head_grad = constrain(head_grad + jnp.einsum("bcd,bcv->dv", hidden_chunk, logits_grad,
                                                 preferred_element_type=jnp.float32),
                          ("embed", "vocab"))
    return head_grad, hidden_grad

  head_grad, hidden_grad = jax.lax.scan(
      chunk, constrain(jnp.zeros(head.shape, jnp.float32), ("embed", "vocab")),
      tuple(_split_positions(x, chunk_len) for x in (hidden, targets, log_z, ce_grad)))
  return _merge_positions(hidden_grad), head_grad.astype(head.dtype), None


_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def token_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                        chunk_len: int) -> jax.Array:
  """-log softmax(hidden @ head)[targets] per position: [B, L, d], [d, V], [B, L] -> [B, L] fp32.

  At most `chunk_len` positions' logits exist at a time (forward and backward); the sequence is
  padded up to a multiple of it.
  """
  length = hidden.shape[1]
  chunk_len = min(chunk_len, length)
  padding = -length % chunk_len
  if padding:
    hidden = jnp.pad(hidden, ((0, 0), (0, padding), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padding)))
  return _cross_entropy(hidden, head, targets.astype(jnp.int32), chunk_len)[:, :length]


def loss_sums(hidden: jax.Array, head: jax.Array, batch: dict, corruption: Corruption,
              config: ObjectiveConfig) -> dict[str, jax.Array]:
  """Sums (not means) so that micro-batches and devices add up exactly.

  `hidden` [B, L, d] are the model's final hidden states and `head` [d, V] its lm_head
  (`Transformer.hidden_states`, `Transformer.output_head`). The loss is `loss_sum / denominator`:
  the mean CE over targets for `omni`; for `llada` the 1/t-weighted CE summed over targets and
  divided by the number of response tokens (the unbiased estimator of the LLaDA bound).
  `targets` counts targets; per-task `task_loss_sum` / `task_targets` [len(TASKS)] give
  unweighted CE means for reporting.
  """
  # Dream shift: the hidden state at i - 1 scores the token at i (the last one scores nothing).
  targets = batch["tokens"][:, 1:]
  target_mask = corruption.masked[:, 1:]
  next_tokens = jnp.pad(targets, ((0, 0), (0, 1)))
  ce = token_cross_entropy(hidden, head, next_tokens, config.logits_chunk_len)[:, :-1]
  ce = jnp.where(target_mask, ce, 0.0)
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
