"""Run a per-shard attention kernel on the model's sharded activations.

Pallas kernels are opaque to the SPMD partitioner, so they run under `jax.shard_map` on the
context mesh: batch split over ("data", "fsdp"), heads over "tensor", sequence and head dim
whole. Grouped-query attention stays local because each shard holds a contiguous range of
query heads and the matching range of K/V heads.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from omnijax.kernels.cudnn import cudnn_attention
from omnijax.kernels.flash import flash_attention
from omnijax.kernels.splash import splash_attention

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def shard_over_mesh(kernel):
  """kernel(q, k, v, segment_ids) on one shard -> the same call on mesh-sharded arrays.

  The mesh comes from the context (`jax.set_mesh`); with none set, the kernel runs directly.
  """
  @functools.wraps(kernel)
  def sharded(q, k, v, segment_ids):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return kernel(q, k, v, segment_ids)
    batch = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names) or None
    heads = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
    head_shards = mesh.shape[heads] if heads else 1
    if k.shape[2] % head_shards:
      raise ValueError(f"{k.shape[2]} key/value heads cannot be split over {head_shards} "
                       f"'{HEAD_AXIS}' shards")
    heads_spec = P(batch, None, heads, None)
    return jax.shard_map(kernel, mesh=mesh, check_vma=False,
                         in_specs=(heads_spec, heads_spec, heads_spec, P(batch, None)),
                         out_specs=heads_spec)(q, k, v, segment_ids)
  return sharded


def mesh_platform() -> str:
  """Platform of the context mesh's devices (compile-only TPU devices in AOT included), else
  the default backend. Read at trace time so one model object serves CPU runs and TPU AOT."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def kernel_for(name: str, platform: str):
  """Model config `attention` name + platform -> attn(q, k, v, segment_ids).

  On CPU the Pallas kernels run in interpret mode, so CPU tests exercise the real kernels.
  """
  interpret = platform == "cpu"
  if name == "pallas":
    kernel_platform = "gpu" if platform == "gpu" else "tpu"
    return shard_over_mesh(functools.partial(flash_attention, platform=kernel_platform,
                                             interpret=interpret))
  if name == "splash":
    if platform == "gpu":
      raise ValueError("attention='splash' is a TPU kernel; on GPU use 'pallas' or 'cudnn'")
    return shard_over_mesh(functools.partial(splash_attention, interpret=interpret))
  if name == "cudnn":
    if platform != "gpu":
      raise ValueError(f"attention='cudnn' needs a GPU, but the platform is {platform!r}; "
                       "use 'xla', or 'pallas'/'splash' on TPU")
    return cudnn_attention
  raise ValueError(f"no kernel backend named {name!r}")


def backend_attention(name: str):
  """attn(q, k, v, segment_ids) that picks the kernel variant for the platform it is traced on."""
  kernel_for(name, "tpu" if name != "cudnn" else "gpu")  # unknown names fail at construction

  def attend(q, k, v, segment_ids):
    return kernel_for(name, mesh_platform())(q, k, v, segment_ids)

  return attend
