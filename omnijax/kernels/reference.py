"""Segment-masked attention: the semantics every kernel implements, and the plain-XLA reference
implementation of them.

Every backend is called as `attn(q, k, v, segment_ids, *, kv_segment_ids=None, causal=False,
q_offset=None)`, with the semantics shared by every backend (and tested against `xla_attention`):
  * q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], Hq a multiple of Hkv (grouped-query attention);
  * segment_ids int32 [B, Lq] are the queries' segments, kv_segment_ids int32 [B, Lk] the keys'
    (by default the same array: self-attention, Lq == Lk); a query attends to the keys of its
    own segment, in both directions; id 0 is padding and is never attended as a key;
  * causal=True (segment-causal) adds: query i sees key j only if j <= q_offset + i. Positions
    are indices along the row, so within a packed row of contiguous segments this is causal
    attention inside each segment. `q_offset` (int, or int32 [B] for one per row; default 0)
    is the key index of the first query: a query block decoded against a longer, cached K/V
    sits at q_offset..q_offset+Lq-1 among its keys;
  * a query row with no visible key (a padding row) returns zeros, never NaN;
  * softmax scale 1/sqrt(D), softmax in fp32.

Backends that lack a case refuse it with one ValueError (`check_supported`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The cases beyond bidirectional self-attention, as `check_supported` names them.
CAUSAL = "causal masking"
CACHED_KV = "a query block against separate (cached) keys (kv_segment_ids / q_offset)"


def requested_cases(kv_segment_ids, causal: bool, q_offset) -> tuple[str, ...]:
  return ((CAUSAL,) if causal else ()) + (
      (CACHED_KV,) if kv_segment_ids is not None or q_offset is not None else ())


def check_supported(backend: str, supported: tuple[str, ...], *, kv_segment_ids, causal: bool,
                    q_offset) -> None:
  """Raises one ValueError naming the backend and the cases it does not support."""
  missing = [case for case in requested_cases(kv_segment_ids, causal, q_offset)
             if case not in supported]
  if missing:
    raise ValueError(f"attention={backend!r} does not support {' nor '.join(missing)}; "
                     "use 'pallas' or 'xla'")


def key_segment_ids(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    kv_segment_ids: jax.Array | None) -> jax.Array:
  """Checks the shapes of an attention call; -> the keys' segment ids (int32 [B, Lk])."""
  batch, q_length, q_heads, head_dim = q.shape
  if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k {k.shape} / v {v.shape} do not match q {q.shape}")
  if q_heads % k.shape[2]:
    raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {k.shape[2]}")
  if segment_ids.shape != (batch, q_length):
    raise ValueError(f"segment_ids {segment_ids.shape} should be {(batch, q_length)}")
  if kv_segment_ids is None:
    if k.shape[1] != q_length:
      raise ValueError(f"{k.shape[1]} keys but {q_length} queries: pass kv_segment_ids for a "
                       "query block against a longer K/V")
    kv_segment_ids = segment_ids
  if kv_segment_ids.shape != (batch, k.shape[1]):
    raise ValueError(f"kv_segment_ids {kv_segment_ids.shape} should be {(batch, k.shape[1])}")
  return kv_segment_ids.astype(jnp.int32)


def query_offsets(q_offset, batch: int) -> jax.Array:
  """q_offset (None, an int or [B] ints) -> int32 [B]."""
  offsets = jnp.asarray(0 if q_offset is None else q_offset, jnp.int32)
  if offsets.ndim > 1 or offsets.size not in (1, batch):
    raise ValueError(f"q_offset {offsets.shape} should be an int or one per row ({batch},)")
  return jnp.broadcast_to(offsets, (batch,))


def segment_mask(segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None, *,
                 causal: bool = False, q_offset=None) -> jax.Array:
  """[B, Lq] and [B, Lk] segment ids -> [B, 1, Lq, Lk] bool: same segment, the key is not
  padding and, when causal, the key is not after the query."""
  keys = segment_ids if kv_segment_ids is None else kv_segment_ids
  mask = (segment_ids[:, :, None] == keys[:, None, :]) & (keys[:, None, :] != 0)
  if causal:
    batch, q_length = segment_ids.shape
    query_at = query_offsets(q_offset, batch)[:, None] + jnp.arange(q_length)
    mask &= jnp.arange(keys.shape[1])[None, None, :] <= query_at[:, :, None]
  return mask[:, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                  kv_segment_ids: jax.Array | None = None, causal: bool = False,
                  q_offset=None) -> jax.Array:
  """Reference attention with plain jnp ops; materialises the [B, H, Lq, Lk] scores."""
  kv_segment_ids = key_segment_ids(q, k, v, segment_ids, kv_segment_ids)
  batch, length, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = q_heads // kv_heads
  # Heads-major, with each KV head's query group stacked along the rows: two plain batched
  # matmuls per KV head (no repeated K/V, and about 2x faster gradients on XLA:CPU than a 5-D
  # einsum).
  q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, groups * length, head_dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  mask = segment_mask(segment_ids.astype(jnp.int32), kv_segment_ids, causal=causal,
                      q_offset=q_offset)
  mask = jnp.tile(mask, (1, 1, groups, 1))  # [B, 1, G*Lq, Lk]
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
