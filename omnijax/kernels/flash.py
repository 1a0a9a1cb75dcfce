"""`flash_attention`: the public entry point of the Pallas kernels and their custom VJP.

This module owns what is the same on every platform: argument checks, padding the lengths to
whole blocks (padding tokens get segment id 0, so they are never attended and their rows are
zero), the block-sparsity tables (segments and, when causal, the diagonal), the softmax scale,
the backward's row term delta = sum(dO * O), and the `jax.custom_vjp` wiring (reverse-mode
autodiff of `pallas_call` is not supported). A platform module (`flash_tpu`, `flash_gpu`,
`flash_mgpu`) supplies the kernels:

  DEFAULT_BLOCK, fit_block(requested, length) -> block size legal for the platform
  SUPPORTED: the cases of omnijax.kernels.reference it implements (CAUSAL, CACHED_KV)
  forward(q, k, v, masking, overlap, *, plan) -> (out, lse [B, Hq, Lq] fp32)
  backward(q, k, v, masking, overlap, lse, delta, d_out, *, plan) -> (dq, dk, dv)

with q/out in the caller's [B, Lq, H, D] layout, k/v in [B, Lk, H, D], Lq a multiple of
block_q and Lk of block_k, and `masking` the `Masking` of the call (a causal kernel masks key j
of query i unless j <= q_offsets[b] + i; `plan.causal` says whether to).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from omnijax.kernels import flash_gpu, flash_mgpu, flash_tpu, tuning
from omnijax.kernels.block_sparsity import block_overlap
from omnijax.kernels.reference import check_supported, key_segment_ids, query_offsets

PLATFORMS = {"tpu": flash_tpu, "gpu": flash_gpu, "mosaic_gpu": flash_mgpu}
# The `model.attention` backend each platform's kernel runs as (what a refusal names).
BACKENDS = {"tpu": "pallas", "gpu": "pallas", "mosaic_gpu": "mosaic_gpu"}
# The kernels the tuning table's blocks were measured for (benchmarks/attention.py --tune);
# the others keep their own blocks.
TUNED_PLATFORMS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """Static kernel settings; hashable because custom_vjp treats it as a non-diff argument."""
  platform: str
  block_q: int
  block_k: int
  scale: float
  interpret: bool
  causal: bool


class Masking(NamedTuple):
  """What decides visibility, padded to whole blocks: int32 [B, Lq], [B, Lk] and [B]."""
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  q_offsets: jax.Array


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                    kv_segment_ids: jax.Array | None = None, causal: bool = False,
                    q_offset=None, block_q: int | None = None, block_k: int | None = None,
                    interpret: bool = False, platform: str | None = None, rows: str = "packed",
                    device_kind: str | None = None) -> jax.Array:
  """Segment-masked attention; same contract (and arguments) as `xla_attention`.

  q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] with Hq a multiple of Hkv, segment_ids int32 [B, Lq].
  `platform` picks the kernel ("tpu": Mosaic, "gpu": Triton, "mosaic_gpu": Hopper Mosaic GPU
  for 16-bit inputs, no interpret mode); by default the one for `jax.default_backend()`, with
  the TPU kernel on CPU (only useful with interpret=True). Blocks not given come from the
  tuning table's entry (Triton and TPU kernels) for `device_kind` (default: the first
  device's), this head dim and key length, and `rows` ("packed" or "dense"), else the
  platform's default.
  """
  platform = platform or ("gpu" if jax.default_backend() == "gpu" else "tpu")
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r} is not one of {sorted(PLATFORMS)}")
  kernels = PLATFORMS[platform]
  check_supported(BACKENDS[platform], kernels.SUPPORTED, kv_segment_ids=kv_segment_ids,
                  causal=causal, q_offset=q_offset)
  separate_keys = kv_segment_ids is not None
  kv_segment_ids = key_segment_ids(q, k, v, segment_ids, kv_segment_ids)
  batch, q_length, _, head_dim = q.shape
  kv_length = k.shape[1]

  tuned = None
  if platform in TUNED_PLATFORMS:
    tuned = tuning.lookup(device_kind or jax.devices()[0].device_kind, head_dim, kv_length, rows)
  block_q = kernels.fit_block(block_q or (tuned.block_q if tuned else kernels.DEFAULT_BLOCK),
                              q_length)
  block_k = kernels.fit_block(block_k or (tuned.block_k if tuned else kernels.DEFAULT_BLOCK),
                              kv_length)
  plan = KernelPlan(platform, block_q, block_k, head_dim ** -0.5, interpret, causal)
  if separate_keys:
    q_padded, kv_padded = _round_up(q_length, block_q), _round_up(kv_length, block_k)
  else:  # one length for both sides: the Mosaic GPU kernel reads one id array for both
    q_padded = kv_padded = _round_up(q_length, math.lcm(block_q, block_k))

  pad = lambda x, padded: jnp.pad(x, [(0, 0), (0, padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  masking = Masking(pad(segment_ids.astype(jnp.int32), q_padded), pad(kv_segment_ids, kv_padded),
                    query_offsets(q_offset, batch))
  return _attention(pad(q, q_padded), pad(k, kv_padded), pad(v, kv_padded), masking,
                    plan)[:, :q_length]


def _round_up(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, masking: Masking, plan: KernelPlan):
  return _attention_forward(q, k, v, masking, plan)[0]


def _attention_forward(q, k, v, masking, plan):
  overlap = block_overlap(masking.q_segment_ids, plan.block_q, plan.block_k,
                          kv_segment_ids=masking.kv_segment_ids, causal=plan.causal,
                          q_offsets=masking.q_offsets)
  out, lse = PLATFORMS[plan.platform].forward(q, k, v, masking, overlap, plan=plan)
  return out, (q, k, v, masking, overlap, out, lse)


def _attention_backward(plan, residuals, d_out):
  q, k, v, masking, overlap, out, lse = residuals
  # delta_i = sum_d dO_i * O_i, the per-row term of the softmax gradient, as [B, Hq, Lq].
  delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(jnp.float32), out.astype(jnp.float32))
  dq, dk, dv = PLATFORMS[plan.platform].backward(
      q, k, v, masking, overlap, lse, delta, d_out, plan=plan)
  return dq, dk, dv, None


_attention.defvjp(_attention_forward, _attention_backward)
