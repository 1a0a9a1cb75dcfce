"""Flash-attention kernels for Hopper GPUs (Pallas -> Mosaic GPU); see `flash.py` for the contract.

Each kernel is one CTA per (head, output block, batch row) with three warpgroups: two compute
warpgroups, each owning half of the output block (64 rows: the M of one WGMMA), and a memory
warpgroup that streams the other side's blocks into shared memory with TMA, several steps
ahead (`plgpu.emit_pipeline_warp_specialized`). Every matmul is a WGMMA from shared memory
(or, for probabilities and dS, from registers) into fp32 accumulators.

Block skipping: the pipeline's grid is not "every block" but the number of blocks that can
share a segment with this CTA's block, and its index map reads which ones from a compacted
schedule (`_schedule`), so a skipped block costs neither a copy nor a matmul.

It implements bidirectional self-attention only: one id array serves queries and keys, and no
causal mask is applied, so flash.py refuses causal calls and separate (cached) keys for it
(`SUPPORTED` is empty).

Unlike the Triton kernel this one needs 16-bit inputs (WGMMA takes fp32 only as TF32, which
would break the fp32 contract) and blocks that are multiples of 128 (two warpgroups x 64 rows);
the head dim is zero-padded to a multiple of 64 (one 128-byte swizzle row of bf16), which
changes no dot product. The softmax runs in base 2 (exp2 of scores pre-multiplied by
log2(e): one FMA per score); the lse it hands to the backward is in natural-log units like
the other kernels'. Masked scores use `flash_math.MASK_VALUE` for the same NaN guard.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from omnijax.kernels import flash_math as fm

try:  # older jax releases have no Mosaic GPU lowering; the backend is then refused
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:
  plgpu = None

WARPGROUP_ROWS = 64  # the M of one WGMMA: rows of the output block a compute warpgroup owns
COMPUTE_WARPGROUPS = 2
# Two warpgroups x 64 rows. The tuning table's blocks are measured for the Triton kernel, so
# this kernel keeps its own; 128 is also FA3's choice on Hopper for head dims up to 128.
DEFAULT_BLOCK = WARPGROUP_ROWS * COMPUTE_WARPGROUPS
HEAD_DIM_MULTIPLE = 64  # one 128-byte swizzled row of 16-bit elements
# Wider heads overflow shared memory even at the smallest blocks (2 x 128-row K and V blocks in
# flight plus the queries: 240 KiB at 192 > Hopper's 227 KiB).
MAX_HEAD_DIM = 128
PIPELINE_STEPS = 2  # blocks in flight: 2 keeps fwd+bwd shared memory under Hopper's 227 KiB
# Rows of the other side a backward pipeline step loads (half a 128 block): a backward step
# holds five [64, step] fp32 tiles besides its accumulators, which only fit the registers at
# 64 (FA3's backward blocks); the schedule still skips whole 128 blocks.
BACKWARD_STEP = 64
MEMORY_REGISTERS = 40  # the TMA warpgroup needs few; the compute warpgroups get the rest
LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED = ()  # of omnijax.kernels.reference's CAUSAL and CACHED_KV
# Hopper (sm_90) device kinds as JAX reports them ("NVIDIA H100 80GB HBM3", "NVIDIA H200", ...).
HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def unavailable_reason(platform: str, device_kind: str | None) -> str | None:
  """Why this kernel cannot run here (one line), or None when it can."""
  if plgpu is None:
    return f"this jax ({jax.__version__}) has no Pallas Mosaic GPU backend"
  if platform != "gpu":
    return f"it needs an NVIDIA Hopper GPU, but the platform is {platform!r}"
  if device_kind is not None and not any(name in device_kind for name in HOPPER_KINDS):
    return f"it needs a Hopper GPU (WGMMA), but the device is {device_kind!r}"
  return None


def fit_block(requested: int, length: int) -> int:
  """Blocks are split between the two compute warpgroups, 64 rows (or a multiple) each."""
  del length  # flash.py pads short sequences up to one block
  if requested % DEFAULT_BLOCK:
    raise ValueError(f"Mosaic GPU blocks must be multiples of {DEFAULT_BLOCK}, got {requested}")
  return requested


def _check_inputs(q, plan):
  if jnp.dtype(q.dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
    raise ValueError(f"attention='mosaic_gpu' takes bfloat16 or float16 inputs, got {q.dtype}")
  if q.shape[-1] > MAX_HEAD_DIM:
    raise ValueError(f"attention='mosaic_gpu' takes head dims up to {MAX_HEAD_DIM}, got "
                     f"{q.shape[-1]}; use 'pallas'")
  if plan.interpret:
    raise ValueError("the Mosaic GPU kernel has no interpret mode (its TMA and WGMMA primitives "
                     "do not run interpreted); test it on CPU by lowering for CUDA")


def _pad_head_dim(x):
  head_dim = x.shape[-1]
  padded = -(-head_dim // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
  return jnp.pad(x, [(0, 0)] * 3 + [(0, padded - head_dim)])


def _schedule(needed):
  """[B, rows, cols] bool -> ([B, rows, cols] needed column indices first, [B, rows] count).

  The pipeline walks the first `count` entries of a row: only the blocks that may hold a
  visible pair, in ascending order.
  """
  order = jnp.argsort(jnp.logical_not(needed), axis=-1, stable=True).astype(jnp.int32)
  return order, needed.sum(axis=-1, dtype=jnp.int32)


def _swizzled():
  """Shared-memory layout WGMMA reads without bank conflicts: 8x64 tiles, 128-byte swizzle."""
  return (plgpu.TilingTransform((8, HEAD_DIM_MULTIPLE)), plgpu.SwizzleTransform(128))


def _mask(row_ids, col_ids, shape):
  """[R] ids (row layout) and [C] ids (column layout) -> [R, C] visibility, as fm.visible."""
  rows = lax.broadcast_in_dim(row_ids, shape, [0])
  cols = lax.broadcast_in_dim(col_ids, shape, [1])
  return (rows == cols) & (cols != 0)


def _matmul(a, b, shape):
  """WGMMA a @ b into a fresh fp32 accumulator of `shape`."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _accumulate(acc, a, b):
  """acc + a @ b, as one WGMMA into the running accumulator."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(run)(plgpu.ACC.init(acc))


def _zeros(shape, layout=None):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout or plgpu.Layout.WGMMA)


def _vector(ref, dim):
  """An [N] vector (segment ids, lse, delta) from shared memory, in the layout that broadcasts
  into a WGMMA tile along dimension `dim` (0: one value per row, 1: one per column)."""
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim))


def _kernel(body, out_type, grid, scratch, name):
  return plgpu.kernel(
      body, out_type=out_type, grid=grid, grid_names=("heads", "blocks", "batch"),
      num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg", scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(approx_math=True), kernel_name=name)


def _pipeline(body, context, grid, in_specs):
  return plgpu.emit_pipeline_warp_specialized(
      body, grid=grid, in_specs=in_specs, max_concurrent_steps=PIPELINE_STEPS,
      memory_registers=MEMORY_REGISTERS, num_compute_wgs=COMPUTE_WARPGROUPS, wg_axis="wg",
      compute_context=context)


def forward(q, k, v, masking, overlap, *, plan):
  _check_inputs(q, plan)
  segment_ids = masking.q_segment_ids  # also the keys': separate keys are refused
  batch, length, q_heads, head_dim = q.shape
  group = q_heads // k.shape[2]
  q, k, v = (_pad_head_dim(x) for x in (q, k, v))
  width = q.shape[-1]
  rows, block_k = plan.block_q // COMPUTE_WARPGROUPS, plan.block_k
  schedule, counts = _schedule(overlap)
  score_scale = plan.scale * LOG2E

  def kernel(q_ref, k_ref, v_ref, ids_ref, schedule_ref, counts_ref, out_ref, lse_ref,
             q_smem2, ids_smem2, lse_smem2, loaded):
    b, head, i = (lax.axis_index(axis) for axis in ("batch", "heads", "blocks"))
    wg = lax.axis_index("wg")
    kv_head = lax.div(head, jnp.int32(group))
    queries = pl.ds(i * plan.block_q + wg * rows, rows)

    def context(run_pipeline):
      q_smem, ids_smem, lse_smem = q_smem2.at[wg], ids_smem2.at[wg], lse_smem2.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, queries, head], q_smem, loaded.at[wg])
      plgpu.copy_gmem_to_smem(ids_ref.at[b, queries], ids_smem, loaded.at[wg])
      plgpu.barrier_wait(loaded.at[wg])
      row_ids = _vector(ids_smem, 0)
      init = (_zeros((rows, width)), _zeros((rows,), plgpu.Layout.WGMMA.reduce(1)) + fm.MASK_VALUE,
              _zeros((rows,), plgpu.Layout.WGMMA.reduce(1)))
      acc, m, l = run_pipeline((init, row_ids))[0]
      # As fm.finish: rows that saw no key (padding) give output 0 and lse 0.
      seen = l > 0
      safe_l = jnp.where(seen, l, 1.0)
      # Q is no longer read: its buffer stages the output for the TMA store.
      q_smem[...] = (acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])).astype(q_smem.dtype)
      lse_smem[...] = jnp.where(seen, (m + jnp.log2(safe_l)) / LOG2E, 0.0)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, queries, head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, head, queries])
      plgpu.wait_smem_to_gmem(0)

    def step(_, k_smem, v_smem, col_ids_smem, carry):
      (acc, m_prev, l_prev), row_ids = carry
      q_smem = q_smem2.at[wg]
      scores = _matmul(q_smem, plgpu.transpose_ref(k_smem, (1, 0)), (rows, block_k))
      mask = _mask(row_ids, _vector(col_ids_smem, 1), scores.shape)
      scores = jnp.where(mask, scores * score_scale, fm.MASK_VALUE)
      m_next = jnp.maximum(m_prev, scores.max(axis=1))
      correction = jnp.exp2(m_prev - m_next)
      probs = jnp.where(mask, jnp.exp2(scores - lax.broadcast_in_dim(m_next, scores.shape, [0])),
                        0.0)
      l_next = correction * l_prev + probs.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
      acc = _accumulate(acc, probs.astype(v_smem.dtype), v_smem)
      return (acc, m_next, l_next), row_ids

    needed = lambda t: schedule_ref[b, i, t]
    _pipeline(step, context, grid=(counts_ref[b, i],), in_specs=[
        plgpu.BlockSpec((block_k, width), lambda t: (needed(t), 0), transforms=_swizzled()),
        plgpu.BlockSpec((block_k, width), lambda t: (needed(t), 0), transforms=_swizzled()),
        plgpu.BlockSpec((block_k,), lambda t: (needed(t),)),
    ])(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head], ids_ref.at[b])

  scratch = [
      plgpu.SMEM((COMPUTE_WARPGROUPS, rows, width), q.dtype, transforms=_swizzled()),
      plgpu.SMEM((COMPUTE_WARPGROUPS, rows), jnp.int32),
      plgpu.SMEM((COMPUTE_WARPGROUPS, rows), jnp.float32),
      plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WARPGROUPS),
  ]
  out, lse = _kernel(
      kernel, [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, q_heads, length), jnp.float32)],
      (q_heads, length // plan.block_q, batch), scratch, "flash_attention_mgpu_fwd",
  )(q, k, v, segment_ids, schedule, counts)
  return out[..., :head_dim], lse


def backward(q, k, v, masking, overlap, lse, delta, d_out, *, plan):
  head_dim = q.shape[-1]
  segment_ids = masking.q_segment_ids
  q, k, v, d_out = (_pad_head_dim(x) for x in (q, k, v, d_out))
  dq = _dq(q, k, v, d_out, lse, delta, segment_ids, *_schedule(overlap), plan=plan)
  dk, dv = _dkv(q, k, v, d_out, lse, delta, segment_ids,
                *_schedule(overlap.transpose(0, 2, 1)), plan=plan)
  return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]


def _dq(q, k, v, d_out, lse, delta, segment_ids, schedule, counts, *, plan):
  """dQ: one CTA per query block, pipelining the K/V blocks that share a segment with it."""
  batch, length, q_heads, width = q.shape
  group = q_heads // k.shape[2]
  rows, steps_per_block = plan.block_q // COMPUTE_WARPGROUPS, plan.block_k // BACKWARD_STEP
  score_scale = plan.scale * LOG2E

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, schedule_ref, counts_ref,
             dq_ref, q_smem2, do_smem2, ids_smem2, lse_smem2, delta_smem2, loaded):
    b, head, i = (lax.axis_index(axis) for axis in ("batch", "heads", "blocks"))
    wg = lax.axis_index("wg")
    queries = pl.ds(i * plan.block_q + wg * rows, rows)

    def context(run_pipeline):
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      for src, dst in ((q_ref.at[b, queries, head], q_smem), (do_ref.at[b, queries, head], do_smem),
                       (ids_ref.at[b, queries], ids_smem2.at[wg]),
                       (lse_ref.at[b, head, queries], lse_smem2.at[wg]),
                       (delta_ref.at[b, head, queries], delta_smem2.at[wg])):
        plgpu.copy_gmem_to_smem(src, dst, loaded.at[wg])
      plgpu.barrier_wait(loaded.at[wg])
      rows_in = (_vector(ids_smem2.at[wg], 0), _vector(lse_smem2.at[wg], 0) * LOG2E,
                 _vector(delta_smem2.at[wg], 0))
      dq = run_pipeline((_zeros((rows, width)), rows_in))[0]
      q_smem[...] = (dq * plan.scale).astype(q_smem.dtype)  # Q is no longer read
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, queries, head])
      plgpu.wait_smem_to_gmem(0)

    def step(_, k_smem, v_smem, col_ids_smem, carry):
      dq, (row_ids, lse2, delta_rows) = carry
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      shape = (rows, BACKWARD_STEP)
      scores = _matmul(q_smem, plgpu.transpose_ref(k_smem, (1, 0)), shape)
      mask = _mask(row_ids, _vector(col_ids_smem, 1), shape)
      probs = jnp.where(mask, jnp.exp2(scores * score_scale
                                       - lax.broadcast_in_dim(lse2, shape, [0])), 0.0)
      d_probs = _matmul(do_smem, plgpu.transpose_ref(v_smem, (1, 0)), shape)
      d_scores = probs * (d_probs - lax.broadcast_in_dim(delta_rows, shape, [0]))
      return _accumulate(dq, d_scores.astype(k_smem.dtype), k_smem), carry[1]

    kv_head = lax.div(head, jnp.int32(group))
    needed = lambda t, half: schedule_ref[b, i, t] * steps_per_block + half
    kv_spec = plgpu.BlockSpec((BACKWARD_STEP, width), lambda t, half: (needed(t, half), 0),
                              transforms=_swizzled())
    _pipeline(step, context, grid=(counts_ref[b, i], steps_per_block), in_specs=[
        kv_spec, kv_spec, plgpu.BlockSpec((BACKWARD_STEP,), lambda t, half: (needed(t, half),)),
    ])(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head], ids_ref.at[b])

  per_wg = lambda *shape: (COMPUTE_WARPGROUPS, rows, *shape)
  scratch = [
      plgpu.SMEM(per_wg(width), q.dtype, transforms=_swizzled()),
      plgpu.SMEM(per_wg(width), q.dtype, transforms=_swizzled()),
      plgpu.SMEM(per_wg(), jnp.int32),
      plgpu.SMEM(per_wg(), jnp.float32),
      plgpu.SMEM(per_wg(), jnp.float32),
      plgpu.Barrier(num_arrivals=5, num_barriers=COMPUTE_WARPGROUPS),
  ]
  return _kernel(kernel, jax.ShapeDtypeStruct(q.shape, q.dtype),
                 (q_heads, length // plan.block_q, batch), scratch, "flash_attention_mgpu_dq")(
      q, k, v, d_out, lse, delta, segment_ids, schedule, counts)


def _dkv(q, k, v, d_out, lse, delta, segment_ids, schedule, counts, *, plan):
  """dK and dV: one CTA per K/V block of a K/V head, pipelining the (query head of its group,
  query block) pairs that share a segment with it; the group's sum stays in registers."""
  batch, length, kv_heads, width = k.shape
  group = q.shape[2] // kv_heads
  rows, steps_per_block = plan.block_k // COMPUTE_WARPGROUPS, plan.block_q // BACKWARD_STEP
  score_scale = plan.scale * LOG2E

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, schedule_ref, counts_ref,
             dk_ref, dv_ref, k_smem2, v_smem2, ids_smem2, loaded):
    b, kv_head, j = (lax.axis_index(axis) for axis in ("batch", "heads", "blocks"))
    wg = lax.axis_index("wg")
    keys = pl.ds(j * plan.block_k + wg * rows, rows)

    def context(run_pipeline):
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      for src, dst in ((k_ref.at[b, keys, kv_head], k_smem), (v_ref.at[b, keys, kv_head], v_smem),
                       (ids_ref.at[b, keys], ids_smem2.at[wg])):
        plgpu.copy_gmem_to_smem(src, dst, loaded.at[wg])
      plgpu.barrier_wait(loaded.at[wg])
      dk, dv, _ = run_pipeline((_zeros((rows, width)), _zeros((rows, width)),
                                _vector(ids_smem2.at[wg], 0)))
      k_smem[...] = (dk * plan.scale).astype(k_smem.dtype)  # K and V are no longer read
      v_smem[...] = dv.astype(v_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, keys, kv_head])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, keys, kv_head])
      plgpu.wait_smem_to_gmem(0)

    # Keys are rows here (as in fm.transposed_grads), so the per-query lse and delta
    # broadcast along columns.
    def step(_, q_smem, do_smem, lse_smem, delta_smem, col_ids_smem, carry):
      dk, dv, key_ids = carry
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      shape = (rows, BACKWARD_STEP)
      scores_t = _matmul(k_smem, plgpu.transpose_ref(q_smem, (1, 0)), shape)
      mask_t = _mask(key_ids, _vector(col_ids_smem, 1), shape)
      lse2 = lax.broadcast_in_dim(_vector(lse_smem, 1) * LOG2E, shape, [1])
      probs_t = jnp.where(mask_t, jnp.exp2(scores_t * score_scale - lse2), 0.0)
      dv = _accumulate(dv, probs_t.astype(do_smem.dtype), do_smem)
      d_probs_t = _matmul(v_smem, plgpu.transpose_ref(do_smem, (1, 0)), shape)
      delta_cols = lax.broadcast_in_dim(_vector(delta_smem, 1), shape, [1])
      d_scores_t = probs_t * (d_probs_t - delta_cols)
      return _accumulate(dk, d_scores_t.astype(q_smem.dtype), q_smem), dv, key_ids

    needed = lambda t, half: schedule_ref[b, j, t] * steps_per_block + half
    q_head = lambda h: kv_head * group + h
    q_spec = plgpu.BlockSpec((BACKWARD_STEP, None, width),
                             lambda h, t, half: (needed(t, half), q_head(h), 0),
                             transforms=_swizzled())
    row_spec = plgpu.BlockSpec((None, BACKWARD_STEP),
                               lambda h, t, half: (q_head(h), needed(t, half)))
    ids_spec = plgpu.BlockSpec((BACKWARD_STEP,), lambda h, t, half: (needed(t, half),))
    _pipeline(step, context, grid=(group, counts_ref[b, j], steps_per_block), in_specs=[
        q_spec, q_spec, row_spec, row_spec, ids_spec,
    ])(q_ref.at[b], do_ref.at[b], lse_ref.at[b], delta_ref.at[b], ids_ref.at[b])

  per_wg = lambda *shape: (COMPUTE_WARPGROUPS, rows, *shape)
  scratch = [
      plgpu.SMEM(per_wg(width), k.dtype, transforms=_swizzled()),
      plgpu.SMEM(per_wg(width), k.dtype, transforms=_swizzled()),
      plgpu.SMEM(per_wg(), jnp.int32),
      plgpu.Barrier(num_arrivals=3, num_barriers=COMPUTE_WARPGROUPS),
  ]
  return _kernel(kernel, [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
                 (kv_heads, length // plan.block_k, batch), scratch, "flash_attention_mgpu_dkv")(
      q, k, v, d_out, lse, delta, segment_ids, schedule, counts)
