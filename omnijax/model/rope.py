"""Rotary position embeddings, rotate-half (non-interleaved) convention as in Qwen2/Dream."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 at every segment start ([B, L] int32), for packed rows."""
  length = segment_ids.shape[-1]
  index = jnp.arange(length, dtype=jnp.int32)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=-1)
  last_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
  return index - last_start


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """x [B, L, H, D] rotated by positions [B, L]; cos/sin in fp32, then cast to x's dtype."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * cos + rotated * sin
