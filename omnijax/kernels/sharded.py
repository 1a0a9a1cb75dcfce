"""Run a per-shard attention kernel on the model's sharded activations.

Pallas kernels are opaque to the SPMD partitioner, so they run under `jax.shard_map` on the
context mesh, split the way `omnijax.sharding.RULES` splits the model's attention activations
(batch over the batch axes, heads over the head axis, sequence and head dim whole).
Grouped-query attention stays local because each shard holds a contiguous range of query heads
and the matching range of K/V heads; the keys' segment ids and the per-row query offsets of a
query block against cached keys split over the batch like the rows they belong to.
"""

from __future__ import annotations

import functools

import jax

from omnijax.kernels.reference import query_offsets
from omnijax.sharding import logical_to_spec, shard_count

# The logical names of the attention activations [B, L, H, D], segment ids [B, L] and per-row
# query offsets [B].
QUERY_AXES = ("batch", "length", "act_heads", "head_dim")
KV_AXES = ("batch", "length", "act_kv_heads", "head_dim")
SEGMENT_AXES = ("batch", "length")
ROW_AXES = ("batch",)


def shard_over_mesh(kernel):
  """kernel(q, k, v, segment_ids, *, kv_segment_ids, causal, q_offset) on one shard -> the
  same call on mesh-sharded arrays.

  The mesh comes from the context (`jax.set_mesh`); with none set, the kernel runs directly.
  The optional arrays reach the kernel only when given, so it sees the same call either way.
  """
  @functools.wraps(kernel)
  def sharded(q, k, v, segment_ids, *, kv_segment_ids=None, causal=False, q_offset=None):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return kernel(q, k, v, segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
                    q_offset=q_offset)
    q_spec, kv_spec = logical_to_spec(QUERY_AXES, mesh), logical_to_spec(KV_AXES, mesh)
    segment_spec = logical_to_spec(SEGMENT_AXES, mesh)
    head_shards = shard_count(KV_AXES[2], mesh)
    if k.shape[2] % head_shards:
      raise ValueError(f"{k.shape[2]} key/value heads cannot be split over {head_shards} "
                       f"{KV_AXES[2]} shards ({kv_spec[2]})")
    optional, optional_specs = {}, {}
    if kv_segment_ids is not None:
      optional["kv_segment_ids"], optional_specs["kv_segment_ids"] = kv_segment_ids, segment_spec
    if q_offset is not None:
      optional["q_offset"] = query_offsets(q_offset, q.shape[0])
      optional_specs["q_offset"] = logical_to_spec(ROW_AXES, mesh)
    per_shard = lambda q, k, v, ids, optional: kernel(q, k, v, ids, causal=causal, **optional)
    return jax.shard_map(per_shard, mesh=mesh, check_vma=False,
                         in_specs=(q_spec, kv_spec, kv_spec, segment_spec, optional_specs),
                         out_specs=q_spec)(q, k, v, segment_ids, optional)
  return sharded
