"""cuDNN fused attention (`jax.nn.dot_product_attention`) behind the `xla_attention` contract.

jax.nn exposes no packed-segment form of the cuDNN kernel, so the segment mask goes in as a
dense boolean mask. cuDNN gives fully masked (padding) rows a uniform average instead of
zeros, so those rows are zeroed afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omnijax.kernels.reference import segment_mask


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  out = jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids),
                                     implementation="cudnn")
  return jnp.where(segment_ids[:, :, None, None] != 0, out, 0).astype(out.dtype)
