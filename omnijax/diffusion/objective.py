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
3072 tokens, and as much again for their gradient): `token_cross_entropy` applies the lm_head in
`vocab_chunks` vocabulary chunks under lax.scan with an online log-sum-exp, and its custom
gradient recomputes each chunk's logits in the backward pass (MaxText's vocabulary tiling).
Chunking the vocabulary rather than the positions also splits the FSDP all-gather of the
lm_head and its gradient's partial sums, which are as large as the logits at 7B scale.
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


def _vocab_chunks(head: jax.Array, chunks: int) -> jax.Array:
  """lm_head [d, V] -> [chunks, d, ceil(V / chunks)]; chunk j holds the columns i * chunks + j.

  Strided chunks keep the tensor sharding: every vocabulary shard (a contiguous block of
  columns) holds its share of every chunk, so no chunk lives on one shard alone. Columns past V
  (padding) are zero and masked out of the softmax.
  """
  width, vocab = head.shape
  padded = -(-vocab // chunks) * chunks
  head = jnp.pad(head, ((0, 0), (0, padded - vocab)))
  return jnp.moveaxis(head.reshape(width, padded // chunks, chunks), 2, 0)


def _chunk_logits(hidden: jax.Array, head_chunk: jax.Array, chunk: jax.Array, chunks: int,
                  vocab: int) -> tuple[jax.Array, jax.Array]:
  """fp32 logits [B, L, V / chunks] of one chunk (the model's, cast as the loss always did) and
  the vocabulary id of each column."""
  logits = output_logits(hidden, head_chunk).astype(jnp.float32)
  ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) * chunks + chunk
  return jnp.where(ids < vocab, logits, -jnp.inf), ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                   chunks: int) -> jax.Array:
  return _cross_entropy_forward(hidden, head, targets, chunks)[0]


def _cross_entropy_forward(hidden, head, targets, chunks):
  vocab = head.shape[1]

  def chunk(carry, inputs):
    running_max, scaled_sum, target_logit = carry
    index, head_chunk = inputs
    logits, ids = _chunk_logits(hidden, head_chunk, index, chunks, vocab)
    # Online log-sum-exp: rescale the running sum to the new maximum.
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    scaled_sum = (scaled_sum * jnp.exp(running_max - new_max) +
                  jnp.sum(jnp.exp(logits - new_max[..., None]), axis=-1))
    # A comparison with the ids (not a gather) stays local to each vocabulary shard.
    target_logit = target_logit + jnp.sum(jnp.where(ids == targets[..., None], logits, 0.0),
                                          axis=-1)
    return (new_max, scaled_sum, target_logit), None

  zeros = jnp.zeros(targets.shape, jnp.float32)
  (running_max, scaled_sum, target_logit), _ = jax.lax.scan(
      chunk, (jnp.full(targets.shape, -jnp.inf), zeros, zeros),
      (jnp.arange(chunks), _vocab_chunks(head, chunks)))
  log_z = running_max + jnp.log(scaled_sum)
  return log_z - target_logit, (hidden, head, targets, log_z)


def _cross_entropy_backward(chunks, residuals, ce_grad):
  """d ce / d logits = softmax - one_hot, applied to the lm_head chunk by chunk."""
  hidden, head, targets, log_z = residuals
  vocab = head.shape[1]

  def chunk(hidden_grad, inputs):
    index, head_chunk = inputs
    logits, ids = _chunk_logits(hidden, head_chunk, index, chunks, vocab)
    probs = jnp.exp(logits - log_z[..., None])
    logits_grad = (ce_grad[..., None] * (probs - (ids == targets[..., None]))).astype(hidden.dtype)
    hidden_grad = hidden_grad + jnp.einsum("blv,dv->bld", logits_grad,
                                           head_chunk.astype(hidden.dtype),
                                           preferred_element_type=jnp.float32)
    # Each chunk's weight gradient is reduced onto the lm_head's shards right away: only a
    # [d, V / chunks] partial sum ever exists whole.
    head_grad = constrain(jnp.einsum("bld,blv->dv", hidden, logits_grad,
                                     preferred_element_type=jnp.float32), ("embed", "vocab"))
    return hidden_grad, head_grad

  hidden_grad, head_grads = jax.lax.scan(
      chunk, jnp.zeros(hidden.shape, jnp.float32),
      (jnp.arange(chunks), _vocab_chunks(head, chunks)))
  # [chunks, d, V / chunks] -> [d, V]: undo the strided split.
  width = head.shape[0]
  head_grad = jnp.moveaxis(head_grads, 0, 2).reshape(width, -1)[:, :vocab]
  return hidden_grad.astype(hidden.dtype), head_grad.astype(head.dtype), None


_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def token_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                        chunks: int) -> jax.Array:
  """-log softmax(hidden @ head)[targets] per position: [B, L, d], [d, V], [B, L] -> [B, L] fp32.

  The vocabulary is split into `chunks` strided chunks: at most one chunk's logits exist at a
  time, forward and backward (which recomputes them).
  """
  return _cross_entropy(hidden, head, targets.astype(jnp.int32), min(chunks, head.shape[1]))


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
  ce = token_cross_entropy(hidden, head, next_tokens, config.vocab_chunks)[:, :-1]
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
