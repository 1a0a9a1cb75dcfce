"""Which (query block, key block) pairs can see each other, decided from segment ids (and, for
causal attention, the block positions) alone.

The flash kernels skip a block pair when no query of one block shares a non-padding segment
with a key of the other, or, when causal, when every key of the key block comes after every
query of the query block (the blocks above the diagonal); the TPU kernel additionally points the skipped steps' DMAs at a
block it already holds, so skipping saves the copy as well as the compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _block_ranges(segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """[B, L] -> ([B, L/block] smallest non-padding id, [B, L/block] largest id).

  A block of pure padding gets an empty range (smallest > largest), so it overlaps nothing.
  """
  batch, length = segment_ids.shape
  blocks = segment_ids.reshape(batch, length // block, block)
  no_padding = jnp.where(blocks > 0, blocks, jnp.iinfo(jnp.int32).max)
  return no_padding.min(axis=-1), blocks.max(axis=-1)


def block_overlap(segment_ids: jax.Array, block_q: int, block_k: int, *,
                  kv_segment_ids: jax.Array | None = None, causal: bool = False,
                  q_offsets: jax.Array | None = None) -> jax.Array:
  """[B, Lq] (and [B, Lk]) ids -> bool [B, Lq/block_q, Lk/block_k]: the pair may hold a
  visible (query, key). Causal as in omnijax.kernels.reference, q_offsets int32 [B]."""
  keys = segment_ids if kv_segment_ids is None else kv_segment_ids
  q_low, q_high = _block_ranges(segment_ids, block_q)
  k_low, k_high = _block_ranges(keys, block_k)
  overlap = (q_low[:, :, None] <= k_high[:, None, :]) & (k_low[:, None, :] <= q_high[:, :, None])
  if causal:
    q_blocks, k_blocks = q_low.shape[1], k_low.shape[1]
    offsets = jnp.zeros(q_low.shape[:1], jnp.int32) if q_offsets is None else q_offsets
    last_query = offsets[:, None] + (jnp.arange(q_blocks) + 1) * block_q - 1
    first_key = jnp.arange(k_blocks) * block_k
    overlap &= first_key[None, None, :] <= last_query[:, :, None]
  return overlap


def fetch_schedule(needed: jax.Array) -> jax.Array:
  """Along the last (reduction) axis: the block index each grid step should load.

  A needed step loads its own block. A skipped step repeats the most recent needed block, so
  the pipeline sees an unchanged index and issues no copy; skipped steps before the first
  needed block load that first block, which the pipeline then already holds when it is used.
  """
  steps = jnp.arange(needed.shape[-1], dtype=jnp.int32)
  latest = jax.lax.cummax(jnp.where(needed, steps, -1), axis=needed.ndim - 1)
  first = jnp.argmax(needed, axis=-1).astype(jnp.int32)[..., None]
  return jnp.where(latest >= 0, latest, first)
