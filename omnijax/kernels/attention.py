"""The attention dispatch point: model config `attention` -> attn(q, k, v, segment_ids).

Every backend implements the semantics of `omnijax.kernels.reference` (and is tested against
its `xla_attention`). The kernel backends pick their variant from the platform they are traced
for (the context mesh's devices, else `jax.default_backend()`) and, when called under
`jax.set_mesh`, run per shard via shard_map (omnijax.kernels.sharded).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from omnijax.config import ATTENTION_BACKENDS
from omnijax.kernels.cudnn import cudnn_attention
from omnijax.kernels.flash import flash_attention
from omnijax.kernels.reference import xla_attention
from omnijax.kernels.sharded import shard_over_mesh
from omnijax.kernels.splash import splash_attention

AttentionFn = Callable[..., jax.Array]


def get_attention(name: str) -> AttentionFn:
  """The single dispatch point: `xla_attention` for "xla", else a platform-picking kernel."""
  if name == "xla":
    return xla_attention
  if name not in ATTENTION_BACKENDS:
    raise ValueError(f"model.attention={name!r} is not one of {ATTENTION_BACKENDS}")
  kernel_for(name, "tpu" if name != "cudnn" else "gpu")  # unknown names fail at construction

  def attend(q, k, v, segment_ids):
    return kernel_for(name, mesh_platform())(q, k, v, segment_ids)

  return attend


def mesh_platform() -> str:
  """Platform of the context mesh's devices (compile-only TPU devices in AOT included), else
  the default backend. Read at trace time so one model object serves CPU runs and TPU AOT."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def kernel_for(name: str, platform: str) -> AttentionFn:
  """Kernel backend name + platform -> attn(q, k, v, segment_ids).

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
