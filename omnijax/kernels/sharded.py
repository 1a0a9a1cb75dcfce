"""Run a per-shard attention kernel on the model's sharded activations.

Pallas kernels are opaque to the SPMD partitioner, so they run under `jax.shard_map` on the
context mesh, split the way `omnijax.sharding.RULES` splits the model's attention activations
(batch over the batch axes, heads over the head axis, sequence and head dim whole).
Grouped-query attention stays local because each shard holds a contiguous range of query heads
and the matching range of K/V heads.
"""

from __future__ import annotations

import functools

import jax

from omnijax.sharding import logical_to_spec, shard_count

# The logical names of the attention activations [B, L, H, D] and segment ids [B, L].
QUERY_AXES = ("batch", "length", "act_heads", "head_dim")
KV_AXES = ("batch", "length", "act_kv_heads", "head_dim")
SEGMENT_AXES = ("batch", "length")


def shard_over_mesh(kernel):
  """kernel(q, k, v, segment_ids) on one shard -> the same call on mesh-sharded arrays.

  The mesh comes from the context (`jax.set_mesh`); with none set, the kernel runs directly.
  """
  @functools.wraps(kernel)
  def sharded(q, k, v, segment_ids):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return kernel(q, k, v, segment_ids)
    q_spec, kv_spec = logical_to_spec(QUERY_AXES, mesh), logical_to_spec(KV_AXES, mesh)
    head_shards = shard_count(KV_AXES[2], mesh)
    if k.shape[2] % head_shards:
      raise ValueError(f"{k.shape[2]} key/value heads cannot be split over {head_shards} "
                       f"{KV_AXES[2]} shards ({kv_spec[2]})")
    return jax.shard_map(kernel, mesh=mesh, check_vma=False,
                         in_specs=(q_spec, kv_spec, kv_spec, logical_to_spec(SEGMENT_AXES, mesh)),
                         out_specs=q_spec)(q, k, v, segment_ids)
  return sharded
