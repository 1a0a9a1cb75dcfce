"""`flash_attention`: the public entry point of the Pallas kernels and their custom VJP.

This module owns what is the same on every platform: argument checks, padding the length to
whole blocks (padding tokens get segment id 0, so they are never attended and their rows are
zero), the block-sparsity tables, the softmax scale, the backward's row term
delta = sum(dO * O), and the `jax.custom_vjp` wiring (reverse-mode autodiff of `pallas_call`
is not supported). A platform module (`flash_tpu`, `flash_gpu`, `flash_mgpu`) supplies the
kernels:

  DEFAULT_BLOCK, fit_block(requested, length) -> block size legal for the platform
  forward(q, k, v, segment_ids, overlap, *, plan) -> (out, lse [B, Hq, L] fp32)
  backward(q, k, v, segment_ids, overlap, lse, delta, d_out, *, plan) -> (dq, dk, dv)

with q/k/v/out in the caller's [B, L, H, D] layout and L already a multiple of both blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from omnijax.kernels import flash_gpu, flash_mgpu, flash_tpu, tuning
from omnijax.kernels.block_sparsity import block_overlap

PLATFORMS = {"tpu": flash_tpu, "gpu": flash_gpu, "mosaic_gpu": flash_mgpu}
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


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                    block_q: int | None = None, block_k: int | None = None,
                    interpret: bool = False, platform: str | None = None, rows: str = "packed",
                    device_kind: str | None = None) -> jax.Array:
  """Segment-masked bidirectional attention; same contract as `xla_attention`.

  q [B, L, Hq, D], k/v [B, L, Hkv, D] with Hq a multiple of Hkv, segment_ids int32 [B, L].
  `platform` picks the kernel ("tpu": Mosaic, "gpu": Triton, "mosaic_gpu": Hopper Mosaic GPU
  for 16-bit inputs, no interpret mode); by default the one for `jax.default_backend()`, with
  the TPU kernel on CPU (only useful with interpret=True). Blocks not given come from the
  tuning table's entry (Triton and TPU kernels) for `device_kind` (default: the first
  device's), this head dim and length, and `rows` ("packed" or "dense"), else the platform's
  default.
  """
  platform = platform or ("gpu" if jax.default_backend() == "gpu" else "tpu")
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r} is not one of {sorted(PLATFORMS)}")
  kernels = PLATFORMS[platform]
  batch, length, q_heads, head_dim = q.shape
  if k.shape != v.shape or k.shape[:2] != (batch, length) or k.shape[3] != head_dim:
    raise ValueError(f"k {k.shape} / v {v.shape} do not match q {q.shape}")
  if q_heads % k.shape[2]:
    raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {k.shape[2]}")
  if segment_ids.shape != (batch, length):
    raise ValueError(f"segment_ids {segment_ids.shape} should be {(batch, length)}")

  tuned = None
  if platform in TUNED_PLATFORMS:
    tuned = tuning.lookup(device_kind or jax.devices()[0].device_kind, head_dim, length, rows)
  block_q = kernels.fit_block(block_q or (tuned.block_q if tuned else kernels.DEFAULT_BLOCK),
                              length)
  block_k = kernels.fit_block(block_k or (tuned.block_k if tuned else kernels.DEFAULT_BLOCK),
                              length)
  whole_blocks = math.lcm(block_q, block_k)
  padded = -(-length // whole_blocks) * whole_blocks
  plan = KernelPlan(platform, block_q, block_k, head_dim ** -0.5, interpret)

  pad = [(0, 0), (0, padded - length)]
  q, k, v = (jnp.pad(x, pad + [(0, 0), (0, 0)]) for x in (q, k, v))
  segment_ids = jnp.pad(segment_ids.astype(jnp.int32), pad)
  return _attention(q, k, v, segment_ids, plan)[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, plan: KernelPlan):
  return _attention_forward(q, k, v, segment_ids, plan)[0]


def _attention_forward(q, k, v, segment_ids, plan):
  overlap = block_overlap(segment_ids, plan.block_q, plan.block_k)
  out, lse = PLATFORMS[plan.platform].forward(q, k, v, segment_ids, overlap, plan=plan)
  return out, (q, k, v, segment_ids, overlap, out, lse)


def _attention_backward(plan, residuals, d_out):
  q, k, v, segment_ids, overlap, out, lse = residuals
  # delta_i = sum_d dO_i * O_i, the per-row term of the softmax gradient, as [B, Hq, L].
  delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(jnp.float32), out.astype(jnp.float32))
  dq, dk, dv = PLATFORMS[plan.platform].backward(
      q, k, v, segment_ids, overlap, lse, delta, d_out, plan=plan)
  return dq, dk, dv, None


_attention.defvjp(_attention_forward, _attention_backward)
