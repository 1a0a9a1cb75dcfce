"""Flash-attention kernels for GPU (Pallas -> Triton); see `flash.py` for the contract.

Triton programs own one output block and loop over the other axis with `fori_loop`, so the
grid has no reduction axis. A loop step whose blocks share no segment (or, causal, lie above
the diagonal) is skipped with `lax.cond` on the overlap table, before any K/V (or Q/dO) load.

Triton needs power-of-two tensors, so the head dim is zero-padded up to one (zeros change no
dot product) and blocks are powers of two. Tensors keep the caller's [B, L, H, D] layout:
Triton loads strided blocks, so no transposes are needed. Grouped-query attention: query head
h reads K/V head h // group; the dK/dV program of a K/V head loops over its query heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from omnijax.kernels import flash_math as fm
from omnijax.kernels.reference import CACHED_KV, CAUSAL

DEFAULT_BLOCK = 64
MIN_BLOCK = 16  # smallest tile Triton's tensor-core dot accepts
SUPPORTED = (CAUSAL, CACHED_KV)


def fit_block(requested: int, length: int) -> int:
  """The requested power-of-two block, cut down to the power of two covering a short sequence."""
  if requested & (requested - 1) or requested < MIN_BLOCK:
    raise ValueError(f"Triton blocks must be powers of two >= {MIN_BLOCK}, got {requested}")
  return min(requested, max(MIN_BLOCK, 1 << (length - 1).bit_length()))


def _pow2_head_dim(x):
  head_dim = x.shape[-1]
  padded = 1 << (head_dim - 1).bit_length()
  return jnp.pad(x, [(0, 0)] * 3 + [(0, padded - head_dim)])


def _compiler_params(head_dim):
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _cost(q, k, matmuls):
  batch, q_length, q_heads, head_dim = q.shape
  pairs = batch * q_heads * q_length * k.shape[1]
  return pl.CostEstimate(flops=2 * matmuls * pairs * head_dim, transcendentals=pairs,
                         bytes_accessed=4 * q.size * q.dtype.itemsize)


def _first_query(offset_ref, block_q, i):
  """Key index of query block i's first query (the row's q_offset for causal masks)."""
  return offset_ref[0] + i * block_q


def _forward_kernel(q_ref, k_ref, v_ref, q_ids_ref, k_ids_ref, offset_ref, needed_ref, out_ref,
                    lse_ref, *, scale, block_k, causal):
  q = q_ref[...]
  q_ids = q_ids_ref[...][:, None]
  block_q = q.shape[0]
  first_query = _first_query(offset_ref, block_q, pl.program_id(2))

  def step(j, carry):
    def update(carry):
      keys = pl.ds(j * block_k, block_k)
      scores = fm.matmul(q, k_ref[keys, :], fm.CONTRACT_LAST) * scale
      mask = fm.visible(q_ids, k_ids_ref[keys][None, :])
      if causal:
        mask &= fm.not_after(first_query, j * block_k, mask.shape)
      return fm.softmax_step(*carry, scores, mask, v_ref[keys, :])
    return jax.lax.cond(needed_ref[j] != 0, update, lambda c: c, carry)

  init = (jnp.full((block_q, 1), fm.MASK_VALUE, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  out, lse = fm.finish(*jax.lax.fori_loop(0, needed_ref.shape[0], step, init))
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _offsets(masking):
  """Per-row query offsets as [B, 1]: a (None, 1) block gives each program its row's."""
  return masking.q_offsets[:, None]


def forward(q, k, v, masking, overlap, *, plan):
  batch, q_length, q_heads, head_dim = q.shape
  kv_length = k.shape[1]
  group = q_heads // k.shape[2]
  bq, bk = plan.block_q, plan.block_k
  q, k, v = (_pow2_head_dim(x) for x in (q, k, v))
  width = q.shape[-1]
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, scale=plan.scale, block_k=bk, causal=plan.causal),
      grid=(batch, q_heads, q_length // bq),
      in_specs=[
          pl.BlockSpec((None, bq, None, width), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, kv_length, None, width), lambda b, h, i: (b, 0, h // group, 0)),
          pl.BlockSpec((None, kv_length, None, width), lambda b, h, i: (b, 0, h // group, 0)),
          pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
          pl.BlockSpec((None, kv_length), lambda b, h, i: (b, 0)),
          pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)),
          pl.BlockSpec((None, None, kv_length // bk), lambda b, h, i: (b, i, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, width), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, q_length), jnp.float32)],
      compiler_params=_compiler_params(width),
      cost_estimate=_cost(q, k, matmuls=2),
      interpret=plan.interpret,
      name="flash_attention_fwd",
  )(q, k, v, masking.q_segment_ids, masking.kv_segment_ids, _offsets(masking),
    overlap.astype(jnp.int32))
  return out[..., :head_dim], lse


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, k_ids_ref, offset_ref,
               needed_ref, dq_ref, *, scale, block_k, causal):
  q, d_out = q_ref[...], do_ref[...]
  lse_row, delta_row = lse_ref[...][None, :], delta_ref[...][None, :]
  q_ids = q_ids_ref[...][None, :]
  first_query = _first_query(offset_ref, q.shape[0], pl.program_id(2))

  def step(j, dq):
    def update(dq):
      keys = pl.ds(j * block_k, block_k)
      k = k_ref[keys, :]
      mask_t = fm.visible(k_ids_ref[keys][:, None], q_ids)
      if causal:
        mask_t &= fm.not_after(first_query, j * block_k, mask_t.shape, key_major=True)
      _, d_scores_t = fm.transposed_grads(q, k, v_ref[keys, :], d_out, lse_row, delta_row,
                                          mask_t, scale)
      return dq + fm.matmul(d_scores_t.astype(k.dtype), k, fm.CONTRACT_FIRST)
    return jax.lax.cond(needed_ref[j] != 0, update, lambda d: d, dq)

  dq = jax.lax.fori_loop(0, needed_ref.shape[0], step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, k_ids_ref,
                offset_ref, needed_ref, dk_ref, dv_ref, *, scale, block_q, group, causal):
  k, v = k_ref[...], v_ref[...]
  k_ids = k_ids_ref[...][:, None]
  q_blocks = needed_ref.shape[0]
  first_key = pl.program_id(2) * k.shape[0]

  def step(t, carry):
    # lax.div/rem, not // and %: t >= 0, and jnp's floor-division wrappers fail to lower.
    head, i = jax.lax.div(t, q_blocks), jax.lax.rem(t, q_blocks)

    def update(carry):
      dk, dv = carry
      queries = pl.ds(i * block_q, block_q)
      q, d_out = q_ref[queries, head, :], do_ref[queries, head, :]
      mask_t = fm.visible(k_ids, q_ids_ref[queries][None, :])
      if causal:
        mask_t &= fm.not_after(_first_query(offset_ref, block_q, i), first_key, mask_t.shape,
                               key_major=True)
      probs_t, d_scores_t = fm.transposed_grads(
          q, k, v, d_out, lse_ref[head, queries][None, :], delta_ref[head, queries][None, :],
          mask_t, scale)
      return (dk + fm.matmul(d_scores_t.astype(q.dtype), q),
              dv + fm.matmul(probs_t.astype(d_out.dtype), d_out))
    return jax.lax.cond(needed_ref[i] != 0, update, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, group * q_blocks, step, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, masking, overlap, lse, delta, d_out, *, plan):
  batch, q_length, q_heads, head_dim = q.shape
  kv_length, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  bq, bk = plan.block_q, plan.block_k
  q, k, v, d_out = (_pow2_head_dim(x) for x in (q, k, v, d_out))
  width = q.shape[-1]
  call = functools.partial(pl.pallas_call, compiler_params=_compiler_params(width),
                           interpret=plan.interpret)
  needed = overlap.astype(jnp.int32)
  ids_and_offsets = (masking.q_segment_ids, masking.kv_segment_ids, _offsets(masking))

  q_block = pl.BlockSpec((None, bq, None, width), lambda b, h, i: (b, i, h, 0))
  kv_whole = pl.BlockSpec((None, kv_length, None, width), lambda b, h, i: (b, 0, h // group, 0))
  row_block = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  dq = call(
      functools.partial(_dq_kernel, scale=plan.scale, block_k=bk, causal=plan.causal),
      grid=(batch, q_heads, q_length // bq),
      in_specs=[q_block, kv_whole, kv_whole, q_block, row_block, row_block,
                pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                pl.BlockSpec((None, kv_length), lambda b, h, i: (b, 0)),
                pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)),
                pl.BlockSpec((None, None, kv_length // bk), lambda b, h, i: (b, i, 0))],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      cost_estimate=_cost(q, k, matmuls=3),
      name="flash_attention_dq",
  )(q, k, v, d_out, lse, delta, *ids_and_offsets, needed)

  # One program per (K/V head, k block); the group's query heads come as one block.
  kv_block = pl.BlockSpec((None, bk, None, width), lambda b, h, j: (b, j, h, 0))
  group_whole = pl.BlockSpec((None, q_length, group, width), lambda b, h, j: (b, 0, h, 0))
  group_rows = pl.BlockSpec((None, group, q_length), lambda b, h, j: (b, h, 0))
  dk, dv = call(
      functools.partial(_dkv_kernel, scale=plan.scale, block_q=bq, group=group,
                        causal=plan.causal),
      grid=(batch, kv_heads, kv_length // bk),
      in_specs=[group_whole, kv_block, kv_block, group_whole, group_rows, group_rows,
                pl.BlockSpec((None, q_length), lambda b, h, j: (b, 0)),
                pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
                pl.BlockSpec((None, 1), lambda b, h, j: (b, 0)),
                pl.BlockSpec((None, None, q_length // bq), lambda b, h, j: (b, j, 0))],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      cost_estimate=_cost(q, k, matmuls=4),
      name="flash_attention_dkv",
  )(q, k, v, d_out, lse, delta, *ids_and_offsets, needed.transpose(0, 2, 1))
  return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
