"""The Mosaic GPU kernel's host-side parts on CPU: its block schedule (which K/V or Q blocks
each CTA pipelines) and its refusals. Its lowering is tested in test_aot.py, its values on a
Hopper GPU in test_flash.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_segments import random_segment_ids
from omnijax.kernels import flash_attention, flash_mgpu
from omnijax.kernels.attention import get_attention
from omnijax.kernels.block_sparsity import block_overlap
from omnijax.kernels.reference import segment_mask

BLOCK = flash_mgpu.DEFAULT_BLOCK


def _visible_blocks(segment_ids):
  """[B, nq, nk] bool from the dense mask: the block pair holds a visible (query, key)."""
  mask = np.asarray(segment_mask(jnp.asarray(segment_ids)))[:, 0]
  batch, length, _ = mask.shape
  blocks = mask.reshape(batch, length // BLOCK, BLOCK, length // BLOCK, BLOCK)
  return blocks.any(axis=(2, 4))


@pytest.mark.parametrize("rows", ["packed", "dense", "padding"])
def test_schedule_walks_exactly_the_needed_blocks(rows):
  rng = np.random.default_rng(0)
  batch, length = 3, 8 * BLOCK
  segment_ids = {
      "packed": random_segment_ids(rng, batch, length, 12),  # last row all padding
      "dense": np.ones((batch, length), np.int32),
      "padding": np.zeros((batch, length), np.int32),
  }[rows]
  overlap = block_overlap(jnp.asarray(segment_ids), BLOCK, BLOCK)
  for needed in (overlap, overlap.transpose(0, 2, 1)):  # forward/dQ, and dK/dV
    schedule, counts = map(np.asarray, flash_mgpu._schedule(needed))
    walked = np.zeros(needed.shape, bool)
    for b, i in np.ndindex(counts.shape):
      steps = schedule[b, i, :counts[b, i]]
      assert list(steps) == sorted(steps)  # ascending, each block once
      walked[b, i, steps] = True
    np.testing.assert_array_equal(walked, np.asarray(needed))
  # Skipping loses nothing: every block pair with a visible pair is walked.
  visible = _visible_blocks(segment_ids)
  assert not np.any(visible & ~np.asarray(overlap))
  expected_steps = {"dense": batch * 8 * 8, "padding": 0}
  if rows in expected_steps:
    assert int(counts.sum()) == expected_steps[rows]
  else:  # packed rows skip most pairs; the all-padding row walks none
    assert 0 < counts.sum() < batch * 8 * 8 / 2 and not counts[-1].any()


def test_refusals_are_one_clear_line():
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  segment_ids = jnp.ones((1, 128), jnp.int32)
  with pytest.raises(ValueError, match="attention='mosaic_gpu' cannot run: it needs an NVIDIA "
                     "Hopper GPU, but the platform is 'cpu'"):
    get_attention("mosaic_gpu")(q, q, q, segment_ids)
  assert "Hopper" in flash_mgpu.unavailable_reason("gpu", "NVIDIA A100-SXM4-80GB")
  assert flash_mgpu.unavailable_reason("gpu", "NVIDIA H100 80GB HBM3") is None
  lower = lambda kernel, x: jax.jit(kernel).trace(x, x, x, segment_ids).lower(
      lowering_platforms=("cuda",))
  with pytest.raises(ValueError, match="takes bfloat16 or float16 inputs, got float32"):
    lower(functools.partial(flash_attention, platform="mosaic_gpu"), q.astype(jnp.float32))
  with pytest.raises(ValueError, match="takes head dims up to 128, got 192"):
    lower(functools.partial(flash_attention, platform="mosaic_gpu"),
          jnp.zeros((1, 128, 2, 192), jnp.bfloat16))
  with pytest.raises(ValueError, match="no interpret mode"):
    lower(functools.partial(flash_attention, platform="mosaic_gpu", interpret=True), q)
  with pytest.raises(ValueError, match="multiples of 128, got 64"):
    lower(functools.partial(flash_attention, platform="mosaic_gpu", block_q=64), q)
