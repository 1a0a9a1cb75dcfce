"""Block-level flash-attention math shared by the TPU (Mosaic) and GPU (Triton) kernels.

Everything here works on values already loaded from refs and uses only ops both Pallas
lowerings support. Row statistics are kept as [rows, 1] columns.

Masked scores use a large finite value rather than -inf: a block where a row sees nothing
then gives exp(0) * 0 terms instead of inf - inf = NaN, and padding rows (no visible key in
any block) finish with l == 0, which `finish` turns into zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# dot_general dimension numbers: a @ b.T and a.T @ b.
CONTRACT_LAST = (((1,), (1,)), ((), ()))
CONTRACT_FIRST = (((0,), (0,)), ((), ()))


def matmul(a: jax.Array, b: jax.Array, dims=(((1,), (0,)), ((), ()))) -> jax.Array:
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def visible(row_ids: jax.Array, col_ids: jax.Array) -> jax.Array:
  """[R, 1] and [1, C] segment ids -> [R, C]: same segment and not padding."""
  return (row_ids == col_ids) & (col_ids != 0)


def not_after(first_query, first_key, shape, *, key_major: bool = False) -> jax.Array:
  """The causal mask of a block: [R, C] bool, key index <= query index, for a block whose
  first query and first key sit at the given indices of the row. Rows are queries, or keys
  when `key_major` (the backward's orientation)."""
  query_axis, key_axis = (1, 0) if key_major else (0, 1)
  queries = first_query + jax.lax.broadcasted_iota(jnp.int32, shape, query_axis)
  keys = first_key + jax.lax.broadcasted_iota(jnp.int32, shape, key_axis)
  return keys <= queries


def softmax_step(m_prev, l_prev, acc_prev, scores, mask, v):
  """One online-softmax update of (running max, running sum, output accumulator)."""
  scores = jnp.where(mask, scores, MASK_VALUE)
  m_next = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))
  correction = jnp.exp(m_prev - m_next)
  probs = jnp.where(mask, jnp.exp(scores - m_next), 0.0)
  l_next = correction * l_prev + probs.sum(axis=-1, keepdims=True)
  acc_next = correction * acc_prev + matmul(probs.astype(v.dtype), v)
  return m_next, l_next, acc_next


def finish(m, l, acc):
  """-> (normalised output, logsumexp); rows that saw no key give output 0 and lse 0."""
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  return acc / safe_l, jnp.where(seen, m + jnp.log(safe_l), 0.0)


def transposed_grads(q, k, v, d_out, lse_row, delta_row, mask_t, scale):
  """Key-major backward block: -> (P^T [Bk, Bq], dS^T [Bk, Bq]), dS^T without the scale.

  Keys are rows so that the per-query lse and delta are lane-major rows ([1, Bq]); both
  backward kernels use this orientation.
  """
  scores_t = matmul(k, q, CONTRACT_LAST) * scale
  probs_t = jnp.where(mask_t, jnp.exp(scores_t - lse_row), 0.0)
  d_probs_t = matmul(v, d_out, CONTRACT_LAST)
  return probs_t, probs_t * (d_probs_t - delta_row)
