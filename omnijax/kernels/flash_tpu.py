"""Flash-attention kernels for TPU (Pallas -> Mosaic); see `flash.py` for the contract.

Layout: heads move in front of the sequence ([B, H, L, D]) so every block's last two dims are
(block, D): legal Mosaic tiles. Segment ids travel as a lane-broadcast column form [B, L, 128]
(ids of the block's rows) and a sublane-broadcast row form [B, 8, L] (ids of the block's
columns), the shapes Mosaic can load as tiles and compare by broadcasting: the forward takes
the queries' ids as columns and the keys' as rows, the backward (key-major) the other way.

Block skipping: the overlap mask and the fetch schedule (block_sparsity.py) are scalar-
prefetched into SMEM, with the per-row query offsets of causal attention. A grid step whose
blocks share no segment (or, causal, lie above the diagonal) does no compute, and its index
maps return the block the pipeline already holds, so it issues no DMA either.

Grouped-query attention: the index maps send query head h to K/V head h // group; the dK/dV
kernel runs one grid row per K/V head and accumulates over its query heads in VMEM, so K/V
are never repeated in HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from omnijax.kernels import flash_math as fm
from omnijax.kernels.block_sparsity import fetch_schedule
from omnijax.kernels.reference import CACHED_KV, CAUSAL

LANES, SUBLANES = 128, 8
DEFAULT_BLOCK = 512
SUPPORTED = (CAUSAL, CACHED_KV)


def fit_block(requested: int, length: int) -> int:
  """The requested block, cut down for short sequences.

  Blocks are multiples of 128: Mosaic tiles are (8, 128) and sequence blocks also lie on lanes
  (key ids, lse and delta rows).
  """
  if requested % LANES:
    raise ValueError(f"TPU blocks must be multiples of {LANES}, got {requested}")
  return min(requested, -(-length // LANES) * LANES)


def _id_columns(segment_ids):
  batch, length = segment_ids.shape
  return jnp.broadcast_to(segment_ids[:, :, None], (batch, length, LANES))


def _id_rows(segment_ids):
  batch, length = segment_ids.shape
  return jnp.broadcast_to(segment_ids[:, None, :], (batch, SUBLANES, length))


def _heads_first(x):
  return x.transpose(0, 2, 1, 3)


def _flat(table):
  """SMEM pads trailing dims of multi-dim arrays heavily; 1-D tables stay compact."""
  return table.astype(jnp.int32).reshape(-1)


def _prefetch(needed, masking):
  """The scalar-prefetched tables: which grid steps compute, the block each step loads, and
  the per-row query offsets that place causal masks."""
  return _flat(needed), _flat(fetch_schedule(needed)), masking.q_offsets


def _cost(q, k, matmuls, *, transcendentals=True):
  batch, q_heads, q_length, head_dim = q.shape
  pairs = batch * q_heads * q_length * k.shape[2]
  bytes_accessed = 2 * (q.size * q.dtype.itemsize + k.size * k.dtype.itemsize * 2)
  return pl.CostEstimate(flops=2 * matmuls * pairs * head_dim,
                         transcendentals=pairs if transcendentals else 0,
                         bytes_accessed=bytes_accessed)


def _compiler_params():
  # The last grid axis is the reduction that accumulates into scratch.
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward_kernel(needed_ref, fetch_ref, offsets_ref, q_ref, k_ref, v_ref, q_ids_ref, k_ids_ref,
                    out_ref, lse_ref, m_ref, l_ref, acc_ref, *, scale, causal):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_blocks, k_blocks = pl.num_programs(2), pl.num_programs(3)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, fm.MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(needed_ref[(b * q_blocks + i) * k_blocks + j] != 0)
  def _update():
    scores = fm.matmul(q_ref[...], k_ref[...], fm.CONTRACT_LAST) * scale
    mask = fm.visible(q_ids_ref[:, :1], k_ids_ref[:1, :])
    if causal:
      mask &= fm.not_after(offsets_ref[b] + i * q_ref.shape[0], j * k_ref.shape[0], mask.shape)
    # m and l live lane-broadcast in [Bq, 128] scratch; the math uses one column.
    m, l, acc = fm.softmax_step(m_ref[:, :1], l_ref[:, :1], acc_ref[...], scores, mask, v_ref[...])
    m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l, l_ref.shape)
    acc_ref[...] = acc

  @pl.when(j == k_blocks - 1)
  def _finish():
    out, lse = fm.finish(m_ref[:, :1], l_ref[:, :1], acc_ref[...])
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def forward(q, k, v, masking, overlap, *, plan):
  batch, q_length, q_heads, head_dim = q.shape
  kv_length, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  bq, bk = plan.block_q, plan.block_k
  q_blocks, k_blocks = q_length // bq, kv_length // bk
  q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)

  def at_kv(b, h, i, j, needed, fetch, *_):
    return b, h // group, fetch[(b * q_blocks + i) * k_blocks + j], 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, q_heads, q_blocks, k_blocks),
      in_specs=[
          pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
          pl.BlockSpec((None, None, bk, head_dim), at_kv),
          pl.BlockSpec((None, None, bk, head_dim), at_kv),
          pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
          pl.BlockSpec((None, SUBLANES, bk), lambda *ix: (ix[0], 0, at_kv(*ix)[2])),
      ],
      out_specs=[
          pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
          pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0)),
      ],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, head_dim), jnp.float32)],
  )
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, scale=plan.scale, causal=plan.causal),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, q_length, LANES), jnp.float32)],
      compiler_params=_compiler_params(),
      cost_estimate=_cost(q, k, matmuls=2),
      interpret=plan.interpret,
      name="flash_attention_fwd",
  )(*_prefetch(overlap, masking), q, k, v, _id_columns(masking.q_segment_ids),
    _id_rows(masking.kv_segment_ids))
  return _heads_first(out), lse[..., 0]


def _dq_kernel(needed_ref, fetch_ref, offsets_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, q_ids_ref, k_ids_ref, dq_ref, acc_ref, *, scale, causal):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_blocks, k_blocks = pl.num_programs(2), pl.num_programs(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(needed_ref[(b * q_blocks + i) * k_blocks + j] != 0)
  def _update():
    k = k_ref[...]
    mask_t = fm.visible(k_ids_ref[:, :1], q_ids_ref[:1, :])
    if causal:
      mask_t &= fm.not_after(offsets_ref[b] + i * q_ref.shape[0], j * k.shape[0], mask_t.shape,
                             key_major=True)
    _, d_scores_t = fm.transposed_grads(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                                        delta_ref[...], mask_t, scale)
    acc_ref[...] += fm.matmul(d_scores_t.astype(k.dtype), k, fm.CONTRACT_FIRST)

  @pl.when(j == k_blocks - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(needed_ref, fetch_ref, offsets_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, q_ids_ref, k_ids_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, scale,
                q_blocks, causal):
  b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  k_blocks = pl.num_programs(2)

  @pl.when(t == 0)
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  @pl.when(needed_ref[(b * k_blocks + j) * q_blocks + t % q_blocks] != 0)
  def _update():
    q, d_out = q_ref[...], do_ref[...]
    mask_t = fm.visible(k_ids_ref[:, :1], q_ids_ref[:1, :])
    if causal:
      first_query = offsets_ref[b] + (t % q_blocks) * q.shape[0]
      mask_t &= fm.not_after(first_query, j * k_ref.shape[0], mask_t.shape, key_major=True)
    probs_t, d_scores_t = fm.transposed_grads(q, k_ref[...], v_ref[...], d_out, lse_ref[...],
                                              delta_ref[...], mask_t, scale)
    dv_acc_ref[...] += fm.matmul(probs_t.astype(d_out.dtype), d_out)
    dk_acc_ref[...] += fm.matmul(d_scores_t.astype(q.dtype), q)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(q, k, v, masking, overlap, lse, delta, d_out, *, plan):
  batch, q_length, q_heads, head_dim = q.shape
  kv_length, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  bq, bk = plan.block_q, plan.block_k
  q_blocks, k_blocks = q_length // bq, kv_length // bk
  q, k, v, d_out = (_heads_first(x) for x in (q, k, v, d_out))
  # Key-major blocks: the queries' ids along lanes, the keys' down the rows.
  q_id_rows, kv_id_columns = _id_rows(masking.q_segment_ids), _id_columns(masking.kv_segment_ids)
  # Per-query rows [B, Hq, 1, L]: (1, block) tiles are legal because 1 is the full dim.
  lse, delta = lse[:, :, None, :], delta[:, :, None, :]
  tile = lambda rows: (None, None, rows, head_dim)
  scratch = lambda rows: pltpu.VMEM((rows, head_dim), jnp.float32)
  call = functools.partial(pl.pallas_call, compiler_params=_compiler_params(),
                           interpret=plan.interpret)

  # dQ: grid (B, Hq, q block, k block) like the forward, K/V fetched by the schedule.
  def at_q(b, h, i, j, *_):
    return b, h, i, 0

  def at_kv(b, h, i, j, needed, fetch, *_):
    return b, h // group, fetch[(b * q_blocks + i) * k_blocks + j], 0

  dq_specs = [
      pl.BlockSpec(tile(bq), at_q),
      pl.BlockSpec(tile(bk), at_kv),
      pl.BlockSpec(tile(bk), at_kv),
      pl.BlockSpec(tile(bq), at_q),
      pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i)),
      pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i)),
      pl.BlockSpec((None, SUBLANES, bq), lambda b, h, i, j, *_: (b, 0, i)),
      pl.BlockSpec((None, bk, LANES), lambda *ix: (ix[0], at_kv(*ix)[2], 0)),
  ]
  dq = call(
      functools.partial(_dq_kernel, scale=plan.scale, causal=plan.causal),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(batch, q_heads, q_blocks, k_blocks), in_specs=dq_specs,
          out_specs=pl.BlockSpec(tile(bq), at_q), scratch_shapes=[scratch(bq)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      cost_estimate=_cost(q, k, matmuls=3),
      name="flash_attention_dq",
  )(*_prefetch(overlap, masking), q, k, v, d_out, lse, delta, q_id_rows, kv_id_columns)

  # dK/dV: grid (B, Hkv, k block, group * q blocks); the last axis walks the group's query
  # heads and their q blocks, accumulating into one dK/dV block.
  overlap_t = overlap.transpose(0, 2, 1)

  def q_block(b, j, t, fetch):
    return fetch[(b * k_blocks + j) * q_blocks + t % q_blocks]

  def at_q_t(b, hk, j, t, needed, fetch, *_):
    return b, hk * group + t // q_blocks, q_block(b, j, t, fetch), 0

  def at_row_t(b, hk, j, t, needed, fetch, *_):
    return b, hk * group + t // q_blocks, 0, q_block(b, j, t, fetch)

  def at_kv_t(b, hk, j, t, *_):
    return b, hk, j, 0

  dkv_specs = [
      pl.BlockSpec(tile(bq), at_q_t),
      pl.BlockSpec(tile(bk), at_kv_t),
      pl.BlockSpec(tile(bk), at_kv_t),
      pl.BlockSpec(tile(bq), at_q_t),
      pl.BlockSpec((None, None, 1, bq), at_row_t),
      pl.BlockSpec((None, None, 1, bq), at_row_t),
      pl.BlockSpec((None, SUBLANES, bq), lambda b, hk, j, t, n, f, *_: (b, 0, q_block(b, j, t, f))),
      pl.BlockSpec((None, bk, LANES), lambda b, hk, j, t, *_: (b, j, 0)),
  ]
  dk, dv = call(
      functools.partial(_dkv_kernel, scale=plan.scale, q_blocks=q_blocks, causal=plan.causal),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(batch, kv_heads, k_blocks, group * q_blocks),
          in_specs=dkv_specs,
          out_specs=[pl.BlockSpec(tile(bk), at_kv_t)] * 2,
          scratch_shapes=[scratch(bk), scratch(bk)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      cost_estimate=_cost(q, k, matmuls=4),
      name="flash_attention_dkv",
  )(*_prefetch(overlap_t, masking), q, k, v, d_out, lse, delta, q_id_rows, kv_id_columns)
  return _heads_first(dq), _heads_first(dk), _heads_first(dv)
