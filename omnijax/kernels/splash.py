"""JAX's splash attention (TPU Pallas) behind the `xla_attention` contract.

It supports causal self-attention (splash's static CausalMask, whose block skipping is its own)
and refuses separate (cached) keys: a padding query there could see no key at all, which
splash turns into NaN (see below). Splash differs from the contract in three ways, each handled
here:
  * it takes one example [H, L, D] with no scale: q is pre-scaled by 1/sqrt(D) and the
    kernel is vmapped over the batch;
  * a row with no visible key divides by zero: padding tokens keep segment id 0 inside splash,
    so they attend to each other (every padding query sees at least itself), and their rows
    are zeroed afterwards; real tokens never share id 0, so they never see padding;
  * the length must be a whole number of blocks: it is padded with more id-0 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from omnijax.kernels.reference import CAUSAL, check_supported

LANES = 128
DEFAULT_BLOCK = 512
SUPPORTED = (CAUSAL,)


def _block_sizes(block: int) -> splash.BlockSizes:
  return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     kv_segment_ids: jax.Array | None = None, causal: bool = False,
                     q_offset=None, block: int = DEFAULT_BLOCK,
                     interpret: bool = False) -> jax.Array:
  """q [B, L, Hq, D], k/v [B, L, Hkv, D], segment_ids int32 [B, L] -> [B, L, Hq, D]."""
  check_supported("splash", SUPPORTED, kv_segment_ids=kv_segment_ids, causal=causal,
                  q_offset=q_offset)
  batch, length, q_heads, head_dim = q.shape
  block = min(block, -(-length // LANES) * LANES)
  padded = -(-length // block) * block
  pad = [(0, 0), (0, padded - length)]
  segment_ids = jnp.pad(segment_ids.astype(jnp.int32), pad)
  # Scale in fp32 and round once, as close as splash allows to scaling the fp32 scores.
  q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(q.dtype)
  q, k, v = (jnp.pad(x, pad + [(0, 0), (0, 0)]).transpose(0, 2, 1, 3) for x in (q, k, v))

  # Masks are static: built while tracing, with this shard's head count and length. A causal
  # padding query still sees itself (id 0, j == i), so no row is empty.
  head_mask = (splash.CausalMask if causal else splash.FullMask)((padded, padded))
  mask = splash.MultiHeadMask([head_mask] * q_heads)
  kernel = splash.make_splash_mha(mask, block_sizes=_block_sizes(block), head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
  per_example = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids))
  out = jax.vmap(per_example)(q, k, v, segment_ids).transpose(0, 2, 1, 3)[:, :length]
  return jnp.where(segment_ids[:, :length, None, None] != 0, out, 0).astype(out.dtype)
