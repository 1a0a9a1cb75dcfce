"""Numerics of every attention kernel (interpret mode on CPU) against `xla_attention`.

On a GPU (benchmarks/gpu_checks.sh runs this file with JAX_PLATFORMS=cuda) the compiled Triton
kernel joins, with the test's small blocks and with the tuning table's, and cuDNN joins the
bf16 test (it takes no fp32). On a Hopper GPU the Mosaic GPU kernel (16-bit only, no interpret
mode) joins the bf16 test and gets its own bf16 test over every shape. fp32 matmuls run at full
precision (no TF32) on every side."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.kernels import flash_attention, flash_mgpu, splash_attention
from omnijax.kernels.cudnn import cudnn_attention
from omnijax.kernels.reference import xla_attention
from kernel_segments import random_segment_ids

KERNELS = {
    # Small blocks so that every case spans several blocks and some pairs are skipped.
    "tpu": functools.partial(flash_attention, platform="tpu", interpret=True, block_q=128,
                             block_k=128),
    "gpu": functools.partial(flash_attention, platform="gpu", interpret=True, block_q=32,
                             block_k=16),
    "splash": functools.partial(splash_attention, block=128, interpret=True),
}
BF16_KERNELS = dict(KERNELS)
if jax.default_backend() == "gpu":
  KERNELS["gpu-compiled"] = functools.partial(flash_attention, platform="gpu", block_q=32,
                                              block_k=16)
  KERNELS["gpu-compiled-tuned"] = functools.partial(flash_attention, platform="gpu")
  BF16_KERNELS = dict(KERNELS, cudnn=cudnn_attention)
HOPPER = (jax.default_backend() == "gpu" and
          flash_mgpu.unavailable_reason("gpu", jax.devices()[0].device_kind) is None)
MOSAIC_GPU = functools.partial(flash_attention, platform="mosaic_gpu")
if HOPPER:
  BF16_KERNELS["mosaic-gpu-compiled"] = MOSAIC_GPU

# (batch, length, q heads, kv heads, head dim, segments per row): odd lengths, GQA ratios
# 1 to 8, up to 12 segments in a row, and (batch > 1) a last row that is all padding.
SHAPES = [
    (1, 37, 2, 2, 32, 2),
    (2, 200, 4, 1, 64, 12),
    (2, 300, 8, 1, 32, 5),
    (2, 129, 6, 2, 128, 3),
]


def _inputs(shape, dtype, seed):
  batch, length, q_heads, kv_heads, head_dim, segments = shape
  rng = np.random.default_rng(seed)
  normal = lambda heads: jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
  segment_ids = jnp.asarray(random_segment_ids(rng, batch, length, segments))
  weights = jnp.asarray(rng.normal(size=(batch, length, q_heads, head_dim)), jnp.float32)
  return normal(q_heads), normal(kv_heads), normal(kv_heads), segment_ids, weights


def _value_and_grads(attention, q, k, v, segment_ids, weights):
  def loss(q, k, v):
    out = attention(q, k, v, segment_ids)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  with jax.default_matmul_precision("highest"):
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _max_error(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_L{}_H{}/{}_D{}_S{}".format(*s))
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_fp32_matches_xla(kernel, shape):
  q, k, v, segment_ids, weights = _inputs(shape, jnp.float32, seed=len(kernel) + shape[1])
  out, grads = _value_and_grads(KERNELS[kernel], q, k, v, segment_ids, weights)
  ref_out, ref_grads = _value_and_grads(xla_attention, q, k, v, segment_ids, weights)

  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  assert _max_error(out, ref_out) <= 2e-6
  for name, grad, ref_grad in zip("qkv", grads, ref_grads):
    assert _max_error(grad, ref_grad) <= 1e-4, name
  # Padding: its query rows are exactly zero and its keys/values receive no gradient.
  padding = (segment_ids == 0)[:, :, None, None]
  assert not bool(jnp.any(jnp.where(padding, out, 0)))
  assert not bool(jnp.any(jnp.where(padding, grads[1], 0)))
  assert not bool(jnp.any(jnp.where(padding, grads[2], 0)))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_dense_rows_match_xla(kernel):
  """One segment a row, no padding: no block pair is skipped."""
  q, k, v, _, weights = _inputs((2, 160, 4, 1, 64, 1), jnp.float32, seed=5)
  segment_ids = jnp.ones((2, 160), jnp.int32)
  out, grads = _value_and_grads(KERNELS[kernel], q, k, v, segment_ids, weights)
  ref_out, ref_grads = _value_and_grads(xla_attention, q, k, v, segment_ids, weights)
  assert _max_error(out, ref_out) <= 2e-6
  for name, grad, ref_grad in zip("qkv", grads, ref_grads):
    assert _max_error(grad, ref_grad) <= 1e-4, name


def _assert_bf16_matches_xla_in_fp32(attention, q, k, v, segment_ids, weights, **masking):
  out, grads = _value_and_grads(functools.partial(attention, **masking), q, k, v, segment_ids,
                                weights)
  as_fp32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = _value_and_grads(functools.partial(xla_attention, **masking),
                                        *map(as_fp32, (q, k, v)), segment_ids, weights)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  for got, want in zip((out, *grads), (ref_out, *ref_grads)):
    assert bool(jnp.all(jnp.isfinite(as_fp32(got))))
    assert _max_error(got, want) <= 1.6e-2 * float(jnp.max(jnp.abs(want)))
  return out, grads


@pytest.mark.parametrize("kernel", sorted(BF16_KERNELS))
def test_bf16_matches_xla_in_fp32(kernel):
  """bf16 inputs vs the fp32 reference on the same (bf16-rounded) inputs.

  bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 3.9e-3). The kernels accumulate in fp32
  but round the probabilities (and dS) to bf16 for the MXU, and round the result once more;
  for values of magnitude ~1 that allows a few steps: 1.6e-2 (4 steps), relative to the
  largest reference value. Measured worst case: 6.3e-3 (dq).
  """
  q, k, v, segment_ids, weights = _inputs((2, 200, 4, 2, 64, 6), jnp.bfloat16, seed=7)
  _assert_bf16_matches_xla_in_fp32(BF16_KERNELS[kernel], q, k, v, segment_ids, weights)


# Collected only on a Hopper GPU, like the compiled Triton kernels in KERNELS (test_aot.py lowers
# the Mosaic GPU kernel for CUDA on any host).
if HOPPER:
  @pytest.mark.parametrize("shape,rows", [(shape, "packed") for shape in SHAPES] + [
      (SHAPES[1], "dense"), (SHAPES[3], "dense"), (SHAPES[2], "padding")],
      ids=lambda x: x if isinstance(x, str) else "B{}_L{}_H{}/{}_D{}_S{}".format(*x))
  def test_mosaic_gpu_bf16_matches_xla_in_fp32(shape, rows):
    """Every shape (GQA 1 to 8, head dims 32 to 128, odd lengths) with packed rows (and an
    all-padding last row), some with dense rows and with all padding: values and grads as in the
    bf16 test above, padding rows exactly zero and padding keys without gradient."""
    q, k, v, segment_ids, weights = _inputs(shape, jnp.bfloat16, seed=shape[1])
    if rows != "packed":
      segment_ids = jnp.full(segment_ids.shape, int(rows == "dense"), jnp.int32)
    out, grads = _assert_bf16_matches_xla_in_fp32(MOSAIC_GPU, q, k, v, segment_ids, weights)
    padding = (segment_ids == 0)[:, :, None, None]
    for x in (out, grads[1], grads[2]):
      assert not bool(jnp.any(jnp.where(padding, x, 0)))


def test_all_padding_gives_zeros_not_nan():
  q, k, v, _, weights = _inputs((1, 64, 2, 1, 32, 1), jnp.float32, seed=3)
  segment_ids = jnp.zeros((1, 64), jnp.int32)
  for kernel in KERNELS.values():
    out, grads = _value_and_grads(kernel, q, k, v, segment_ids, weights)
    assert not bool(jnp.any(out)) and not any(bool(jnp.any(g)) for g in grads)


# Causal (segment-causal) attention and a query block against a longer, cached K/V: every
# backend that supports them, against the contract written out directly (`_naive_attention`).
CAUSAL_KERNELS = KERNELS  # splash included: it supports causal self-attention
CACHED_KV_KERNELS = {name: kernel for name, kernel in KERNELS.items() if name != "splash"}


def _naive_attention(q, k, v, q_ids, kv_ids, *, causal=False, q_offset=0):
  """The contract of omnijax.kernels.reference spelled out independently of it: an explicit
  visibility table (numpy), repeated K/V heads and a masked softmax in fp32."""
  q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
  batch, q_length = q_ids.shape
  query_at = np.broadcast_to(np.asarray(q_offset), (batch,))[:, None] + np.arange(q_length)
  visible = (q_ids[:, :, None] == kv_ids[:, None, :]) & (kv_ids[:, None, :] != 0)
  if causal:
    visible &= np.arange(kv_ids.shape[1])[None, None, :] <= query_at[:, :, None]
  group = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) / np.sqrt(q.shape[-1])
  mask = visible[:, None]
  # The max only keeps exp() in range (softmax does not depend on it); finite for empty rows.
  row_max = jax.lax.stop_gradient(jnp.max(jnp.where(mask, scores, -1e30), -1, keepdims=True))
  weights = jnp.exp(jnp.where(mask, scores, -jnp.inf) - row_max)
  total = weights.sum(-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)


def _assert_matches(out, grads, ref_out, ref_grads):
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  assert _max_error(out, ref_out) <= 2e-6
  for name, grad, ref_grad in zip("qkv", grads, ref_grads):
    assert _max_error(grad, ref_grad) <= 1e-4, name


def _cached_inputs(causal, queries, seed):
  """A query block of 130 rows against 300 cached keys, at per-row offsets 0, 170 and 50 (the
  last row all padding). queries="cache": the block's ids are the keys' ids at its offset, as
  when a sampler decodes a block of its own row; "unrelated": ids of another layout, so some
  queries see no key at all (zeros, never NaN)."""
  rng = np.random.default_rng(seed)
  batch, q_length, kv_length, q_heads, kv_heads, head_dim = 3, 130, 300, 4, 2, 32
  kv_ids = random_segment_ids(rng, batch, kv_length, 4)
  offsets = np.array([0, 170, 50], np.int32)
  if queries == "cache":
    q_ids = np.stack([row[o:o + q_length] for row, o in zip(kv_ids, offsets)])
  else:
    q_ids = random_segment_ids(rng, batch, q_length, 6)
  normal = lambda length, heads: jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)),
                                             jnp.float32)
  q, k, v = normal(q_length, q_heads), normal(kv_length, kv_heads), normal(kv_length, kv_heads)
  weights = normal(q_length, q_heads)
  masking = dict(kv_segment_ids=jnp.asarray(kv_ids), causal=causal, q_offset=jnp.asarray(offsets))
  return q, k, v, jnp.asarray(q_ids), weights, masking


def _naive_for(masking):
  return functools.partial(
      lambda q, k, v, ids, *, kv_segment_ids=None, **rest: _naive_attention(
          q, k, v, ids, ids if kv_segment_ids is None else kv_segment_ids, **rest),
      **masking)


@pytest.mark.parametrize("queries", ["cache", "unrelated"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_xla_reference_matches_the_contract(causal, queries):
  q, k, v, q_ids, weights, masking = _cached_inputs(causal, queries, seed=int(causal))
  out, grads = _value_and_grads(functools.partial(xla_attention, **masking), q, k, v, q_ids,
                                weights)
  ref_out, ref_grads = _value_and_grads(_naive_for(masking), q, k, v, q_ids, weights)
  _assert_matches(out, grads, ref_out, ref_grads)
  if queries == "unrelated":  # the case is real: some query rows see nothing and are zero
    unseen = ~np.asarray(jnp.any(jnp.abs(ref_out) > 0, axis=(2, 3)))
    assert unseen[:2].any() and not bool(jnp.any(out[unseen]))


@pytest.mark.parametrize("shape", [(2, 200, 4, 2, 64, 5), (1, 160, 2, 1, 32, 1)],
                         ids=["packed", "dense"])
@pytest.mark.parametrize("kernel", sorted(CAUSAL_KERNELS))
def test_causal_matches_the_contract(kernel, shape):
  """Segment-causal self-attention (an AR training step): causal inside each packed segment."""
  q, k, v, segment_ids, weights = _inputs(shape, jnp.float32, seed=shape[1] + len(kernel))
  attention = functools.partial(CAUSAL_KERNELS[kernel], causal=True)
  out, grads = _value_and_grads(attention, q, k, v, segment_ids, weights)
  ref_out, ref_grads = _value_and_grads(_naive_for(dict(causal=True)), q, k, v, segment_ids,
                                        weights)
  _assert_matches(out, grads, ref_out, ref_grads)
  # The mask really is causal: the bidirectional result differs.
  assert _max_error(out, _naive_attention(q, k, v, segment_ids, segment_ids)) > 1e-2
  padding = (segment_ids == 0)[:, :, None, None]
  for x in (out, grads[1], grads[2]):
    assert not bool(jnp.any(jnp.where(padding, x, 0)))


@pytest.mark.parametrize("queries", ["cache", "unrelated"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kernel", sorted(CACHED_KV_KERNELS))
def test_query_block_against_cached_keys_matches_the_contract(kernel, causal, queries):
  q, k, v, q_ids, weights, masking = _cached_inputs(causal, queries, seed=len(kernel))
  attention = functools.partial(CACHED_KV_KERNELS[kernel], **masking)
  out, grads = _value_and_grads(attention, q, k, v, q_ids, weights)
  ref_out, ref_grads = _value_and_grads(_naive_for(masking), q, k, v, q_ids, weights)
  _assert_matches(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("attention", [xla_attention, KERNELS["tpu"]], ids=["xla", "tpu"])
def test_query_block_equals_its_rows_of_full_causal_attention(attention):
  """What a KV-cached decoder relies on: the block at offset o against the whole row's K/V
  gives exactly rows o.. of the row's causal self-attention."""
  q, k, v, segment_ids, _ = _inputs((2, 260, 4, 2, 32, 3), jnp.float32, seed=11)
  full = xla_attention(q, k, v, segment_ids, causal=True)
  offset, rows = 131, 64
  block = attention(q[:, offset:offset + rows], k, v, segment_ids[:, offset:offset + rows],
                    kv_segment_ids=segment_ids, causal=True, q_offset=offset)
  assert _max_error(block, full[:, offset:offset + rows]) <= 2e-6


@pytest.mark.parametrize("kernel", sorted(set(BF16_KERNELS) & (set(CACHED_KV_KERNELS) | {"cudnn"})))
def test_bf16_causal_query_block_matches_xla_in_fp32(kernel):
  """bf16 as in the bf16 test above, for a causal query block at per-row offsets; on a GPU
  cuDNN joins (it takes no fp32)."""
  q, k, v, q_ids, weights, masking = _cached_inputs(True, "cache", seed=13)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  _assert_bf16_matches_xla_in_fp32(BF16_KERNELS[kernel], q, k, v, q_ids, weights, **masking)


def test_cudnn_wrapper_masks_every_case(monkeypatch):
  """cuDNN itself needs a GPU (gpu_checks.sh runs it in the bf16 test above); here its wrapper
  (the dense mask, zeroed empty rows) runs with jax.nn's XLA implementation of the same call."""
  original = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *args, implementation, **kwargs: original(*args, **kwargs))
  for causal in (False, True):
    q, k, v, q_ids, weights, masking = _cached_inputs(causal, "unrelated", seed=3)
    out, grads = _value_and_grads(functools.partial(cudnn_attention, **masking), q, k, v, q_ids,
                                  weights)
    ref_out, ref_grads = _value_and_grads(_naive_for(masking), q, k, v, q_ids, weights)
    _assert_matches(out, grads, ref_out, ref_grads)
