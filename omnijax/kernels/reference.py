"""Segment-masked bidirectional attention: the semantics every kernel implements, and the
plain-XLA reference implementation of them.

Semantics shared by every backend (and tested against `xla_attention`):
  * q [B, L, Hq, D], k/v [B, L, Hkv, D], Hq a multiple of Hkv (grouped-query attention);
  * segment_ids int32 [B, L]: a query attends to every key of its own segment, in both
    directions; id 0 is padding and is never attended as a key;
  * a query row with no visible key (a padding row) returns zeros, never NaN;
  * softmax scale 1/sqrt(D), softmax in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, L] segment ids -> [B, 1, L, L] bool: same segment and the key is not padding."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & (segment_ids[:, None, :] != 0))[:, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Reference attention with plain jnp ops; materialises the [B, H, L, L] scores."""
  batch, length, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if q_heads % kv_heads:
    raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
  groups = q_heads // kv_heads
  # Heads-major, with each KV head's query group stacked along the rows: two plain batched
  # matmuls per KV head (no repeated K/V, and about 2x faster gradients on XLA:CPU than a 5-D
  # einsum).
  q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, groups * length, head_dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  mask = jnp.tile(segment_mask(segment_ids), (1, 1, groups, 1))  # [B, 1, G*L, L]
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  # Rows with no visible key have max -inf; pin it to 0 so exp() gives 0 instead of NaN.
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(scores - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, length, q_heads, head_dim).astype(q.dtype)
