"""cuDNN fused attention (`jax.nn.dot_product_attention`) behind the `xla_attention` contract.

jax.nn exposes no packed-segment form of the cuDNN kernel, so the whole mask (segments, and the
causal diagonal at the call's query offsets) goes in as a dense boolean mask; that covers every
case of the contract, causal and separate (cached) keys included. cuDNN gives fully masked
rows (padding, or a query that sees no key) a uniform average instead of zeros, so those rows
are zeroed afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omnijax.kernels.reference import key_segment_ids, segment_mask


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                    kv_segment_ids: jax.Array | None = None, causal: bool = False,
                    q_offset=None) -> jax.Array:
  kv_segment_ids = key_segment_ids(q, k, v, segment_ids, kv_segment_ids)
  mask = segment_mask(segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  sees_a_key = mask[:, 0].any(axis=-1)  # [B, Lq]
  return jnp.where(sees_a_key[:, :, None, None], out, 0).astype(out.dtype)
