"""The block-skipping tables: never skip a pair that has visible entries, and skip the rest
when segments are packed in order (causal: also the pairs above the diagonal)."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.kernels.block_sparsity import block_overlap, fetch_schedule
from omnijax.kernels.reference import segment_mask
from kernel_segments import random_segment_ids


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 8), (8, 64)])
def test_overlap_is_exact_for_packed_rows(block_q, block_k):
  segment_ids = jnp.asarray(random_segment_ids(np.random.default_rng(block_k), 3, 256, 9))
  overlap = block_overlap(segment_ids, block_q, block_k)
  visible = segment_mask(segment_ids)[:, 0].reshape(3, 256 // block_q, block_q, 256 // block_k,
                                                    block_k)
  exact = visible.any(axis=(2, 4))
  np.testing.assert_array_equal(overlap, exact)
  assert not bool(overlap.all())  # the tests of the kernels do exercise skipping


def test_fetch_schedule_repeats_the_last_needed_block():
  needed = jnp.asarray([[0, 0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(fetch_schedule(needed),
                                [[2, 2, 2, 2, 4, 5, 5], [0, 0, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 8), (8, 64)])
def test_causal_overlap_is_exact_for_packed_rows(block_q, block_k):
  segment_ids = jnp.asarray(random_segment_ids(np.random.default_rng(block_q), 3, 256, 9))
  overlap = block_overlap(segment_ids, block_q, block_k, causal=True)
  visible = segment_mask(segment_ids, causal=True)[:, 0].reshape(
      3, 256 // block_q, block_q, 256 // block_k, block_k)
  np.testing.assert_array_equal(overlap, visible.any(axis=(2, 4)))
  # Causal skips more than the segments alone: the pairs above the diagonal.
  assert bool(jnp.any(block_overlap(segment_ids, block_q, block_k) & ~overlap))


def test_causal_dense_rows_skip_exactly_the_blocks_above_the_diagonal():
  ones = jnp.ones((2, 64), jnp.int32)
  lower = np.tril(np.ones((4, 4), bool))
  np.testing.assert_array_equal(block_overlap(ones, 16, 16, causal=True), [lower, lower])
  # A query block of 16 rows at offsets 0 and 40 against 64 keys: keys up to 15 and up to 55.
  block = block_overlap(ones[:, :16], 16, 16, kv_segment_ids=ones, causal=True,
                        q_offsets=jnp.array([0, 40], jnp.int32))
  np.testing.assert_array_equal(block, [[[1, 0, 0, 0]], [[1, 1, 1, 1]]])


def test_query_block_overlap_never_skips_a_visible_pair():
  rng = np.random.default_rng(4)
  kv_ids = jnp.asarray(random_segment_ids(rng, 3, 256, 6))
  q_ids = jnp.asarray(random_segment_ids(rng, 3, 64, 4))
  offsets = jnp.array([0, 100, 192], jnp.int32)
  for causal in (False, True):
    overlap = block_overlap(q_ids, 16, 32, kv_segment_ids=kv_ids, causal=causal,
                            q_offsets=offsets)
    visible = segment_mask(q_ids, kv_ids, causal=causal, q_offset=offsets)[:, 0]
    needed = visible.reshape(3, 4, 16, 8, 32).any(axis=(2, 4))
    assert not bool(jnp.any(needed & ~overlap))
    assert not bool(overlap.all())
