"""The cross-entropy every objective uses, without materialising the [tokens, vocab] logits.

The fp32 logits are 2 GiB per chip for omni7b at 3072 tokens, and as much again for their
gradient: `token_cross_entropy` applies the lm_head in `vocab_chunks` vocabulary chunks under
lax.scan with an online log-sum-exp, and its custom gradient recomputes each chunk's logits in
the backward pass (MaxText's vocabulary tiling). Chunking the vocabulary rather than the
positions also splits the FSDP all-gather of the lm_head and its gradient's partial sums, which
are as large as the logits at 7B scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from omnijax.model.transformer import output_logits
from omnijax.sharding import constrain


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
