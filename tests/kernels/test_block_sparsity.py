"""The block-skipping tables: never skip a pair that has visible entries, and skip the rest
when segments are packed in order."""

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
