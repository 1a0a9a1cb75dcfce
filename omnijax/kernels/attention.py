"""The attention dispatch point: model config `attention` -> attn(q, k, v, segment_ids, *,
kv_segment_ids=None, causal=False, q_offset=None).

Every backend implements the semantics of `omnijax.kernels.reference` (and is tested against
its `xla_attention`), or refuses a case it lacks (causal masking, a query block against
separate cached keys) with one ValueError naming itself and the case. The kernel backends pick their variant from the platform they are traced
for (the context mesh's devices, else `jax.default_backend()`) and, when called under
`jax.set_mesh`, run per shard via shard_map (omnijax.kernels.sharded).

`auto` resolves, also at trace time, to the backend `resolve_auto` names for the platform, the
shapes and the row kind. Rows are "packed" (several segments a row: training) unless the caller
traces the model inside `attention_rows("dense")` (one segment a row: the sampler).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from omnijax.config import ATTENTION_BACKENDS
from omnijax.kernels import flash_mgpu, tuning
from omnijax.kernels.cudnn import cudnn_attention
from omnijax.kernels.flash import flash_attention
from omnijax.kernels.reference import xla_attention
from omnijax.kernels.sharded import shard_over_mesh
from omnijax.kernels.splash import splash_attention

log = logging.getLogger(__name__)

AttentionFn = Callable[..., jax.Array]

_ROWS = contextvars.ContextVar("attention_rows", default="packed")
# cuDNN's fused attention takes 16-bit inputs and head dims up to 128 only.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128
# Backends that refuse any other platform (at trace time, when the platform is known).
GPU_ONLY = ("cudnn", "mosaic_gpu")


@contextlib.contextmanager
def attention_rows(rows: str) -> Iterator[None]:
  """Attention traced inside sees rows of kind `rows` ("packed" or "dense"). Jitted functions
  keep the choice they were traced with, so enter it inside the traced function."""
  if rows not in tuning.ROW_KINDS:
    raise ValueError(f"attention rows={rows!r}: expected one of {tuning.ROW_KINDS}")
  token = _ROWS.set(rows)
  try:
    yield
  finally:
    _ROWS.reset(token)


def get_attention(name: str) -> AttentionFn:
  """The single dispatch point: `xla_attention` for "xla", else a platform-picking kernel."""
  if name == "xla":
    return xla_attention
  if name not in ATTENTION_BACKENDS:
    raise ValueError(f"model.attention={name!r} is not one of {ATTENTION_BACKENDS}")
  if name not in ("auto", *GPU_ONLY):
    kernel_for(name, "tpu")  # unknown names fail at construction

  def attend(q, k, v, segment_ids, *, kv_segment_ids=None, causal=False, q_offset=None):
    platform, device_kind, rows = mesh_platform(), mesh_device_kind(), _ROWS.get()
    masking = dict(kv_segment_ids=kv_segment_ids, causal=causal, q_offset=q_offset)
    backend = name
    if name == "auto":
      backend = resolve_auto(platform, rows, device_kind=device_kind, head_dim=q.shape[-1],
                             length=k.shape[1], dtype=q.dtype)
      _log_choice(platform, device_kind, rows, backend)
      if backend == "xla":
        return xla_attention(q, k, v, segment_ids, **masking)
    kernel = kernel_for(backend, platform, rows=rows, device_kind=device_kind)
    return kernel(q, k, v, segment_ids, **masking)

  return attend


def resolve_auto(platform: str, rows: str, *, device_kind: str, head_dim: int, length: int,
                 dtype) -> str:
  """The fastest correct backend for this platform, shape and row kind.

  CPU: xla (the Pallas kernels only run interpreted there). TPU: pallas, omnijax's flash kernel
  (what every TPU config runs). GPU: the tuning table's measured winner for the device and shape
  class; without an entry, pallas for packed rows (its block skipping beats cuDNN's dense mask)
  and cuDNN for dense rows; always pallas where cuDNN cannot run (32-bit inputs, head dim > 128).
  Never mosaic_gpu: its values are verified only by lowering until a GPU session runs its
  numerics (benchmarks/gpu_checks.sh); it stays an explicit opt-in until then.
  """
  if rows not in tuning.ROW_KINDS:
    raise ValueError(f"attention rows={rows!r}: expected one of {tuning.ROW_KINDS}")
  if platform == "tpu":
    return "pallas"
  if platform != "gpu":
    return "xla"
  if jnp.dtype(dtype) not in CUDNN_DTYPES or head_dim > CUDNN_MAX_HEAD_DIM:
    return "pallas"
  tuned = tuning.lookup(device_kind, head_dim, length, rows)
  if tuned is not None and tuned.fastest in ("pallas", "cudnn"):
    return tuned.fastest
  return "pallas" if rows == "packed" else "cudnn"


_LOGGED: set[tuple[str, str, str, str]] = set()


def _log_choice(platform: str, device_kind: str, rows: str, backend: str) -> None:
  """One line per distinct choice (not per layer or per retrace)."""
  if (platform, device_kind, rows, backend) not in _LOGGED:
    _LOGGED.add((platform, device_kind, rows, backend))
    log.info("model.attention=auto: %s for %s rows on %s (%s)", backend, rows, device_kind,
             platform)


def _mesh_device():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else getattr(mesh, "abstract_device", None)


def mesh_platform() -> str:
  """Platform of the context mesh's devices (compile-only TPU devices in AOT included), else
  the default backend. Read at trace time so one model object serves CPU runs and TPU AOT."""
  device = _mesh_device()
  return device.platform if device is not None else jax.default_backend()


def mesh_device_kind() -> str:
  """Device kind ("NVIDIA H200", "TPU v5 lite", "cpu") of the context mesh, else of the first
  device: the tuning table's key."""
  device = _mesh_device()
  return device.device_kind if device is not None else jax.devices()[0].device_kind


def kernel_for(name: str, platform: str, *, rows: str = "packed",
               device_kind: str | None = None) -> AttentionFn:
  """Kernel backend name + platform -> attn(q, k, v, segment_ids, **masking).

  On CPU the Pallas kernels run in interpret mode, so CPU tests exercise the real kernels.
  The Pallas kernel takes its blocks from the tuning table for `device_kind` and `rows`.
  """
  interpret = platform == "cpu"
  if name == "pallas":
    kernel_platform = "gpu" if platform == "gpu" else "tpu"
    return shard_over_mesh(functools.partial(flash_attention, platform=kernel_platform,
                                             interpret=interpret, rows=rows,
                                             device_kind=device_kind))
  if name == "splash":
    if platform == "gpu":
      raise ValueError("attention='splash' is a TPU kernel; on GPU use 'pallas' or 'cudnn'")
    return shard_over_mesh(functools.partial(splash_attention, interpret=interpret))
  if name == "cudnn":
    if platform != "gpu":
      raise ValueError(f"attention='cudnn' needs a GPU, but the platform is {platform!r}; "
                       "use 'xla', or 'pallas'/'splash' on TPU")
    return cudnn_attention
  if name == "mosaic_gpu":
    reason = flash_mgpu.unavailable_reason(platform, device_kind)
    if reason:
      raise ValueError(f"attention='mosaic_gpu' cannot run: {reason}; use 'auto' or 'pallas'")
    return shard_over_mesh(functools.partial(flash_attention, platform="mosaic_gpu", rows=rows,
                                             device_kind=device_kind))
  raise ValueError(f"no kernel backend named {name!r}")
