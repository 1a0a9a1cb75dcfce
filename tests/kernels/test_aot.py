"""The sharded Pallas kernels compile for real TPU topologies (Mosaic), and the Triton and Mosaic
GPU (Hopper) kernels lower for CUDA, all on this CPU-only machine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from omnijax.kernels import flash_attention, splash_attention
from omnijax.kernels.sharded import shard_over_mesh

BATCH, LENGTH, Q_HEADS, KV_HEADS, HEAD_DIM = 8, 1024, 8, 4, 128


def _compile_only_mesh(topology: str) -> Mesh:
  """Compile-only TPU devices of `topology`, as a ("data", "fsdp", "tensor") mesh (tensor 2)."""
  from jax.experimental import topologies
  devices = np.array(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  return Mesh(devices.reshape(-1, 2, 2), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)


def _abstract_inputs(mesh, dtype):
  heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  shape = lambda h: jax.ShapeDtypeStruct((BATCH, LENGTH, h, HEAD_DIM), dtype, sharding=heads)
  segment_ids = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32,
                                     sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
  return shape(Q_HEADS), shape(KV_HEADS), shape(KV_HEADS), segment_ids


def _forward_and_backward(attention):
  def run(q, k, v, segment_ids):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids), q, k, v)
    return out, vjp(out)
  return run


@pytest.mark.libtpu
@pytest.mark.parametrize("topology,dtype,kernel", [
    ("v5e:2x4", jnp.bfloat16, functools.partial(flash_attention, platform="tpu")),
    ("v5p:2x2x1", jnp.float32,
     functools.partial(flash_attention, platform="tpu", block_q=256, block_k=128)),
    ("v5e:2x4", jnp.bfloat16, splash_attention),
], ids=["flash-v5e-bf16", "flash-v5p-fp32-256x128", "splash-v5e-bf16"])
def test_sharded_kernel_compiles_for_tpu(topology, dtype, kernel):
  # Compile-only: omnijax.processes lets libtpu load beside another test process (conftest).
  mesh = _compile_only_mesh(topology)
  # Inside the mesh context only: some Mosaic lowering rules read the device kind from it,
  # and a global TPU mesh would send later eager CPU ops to compile-only devices.
  with jax.set_mesh(mesh):
    step = jax.jit(_forward_and_backward(shard_over_mesh(kernel)))
    compiled = step.lower(*_abstract_inputs(mesh, dtype)).compile()

  # Forward, dQ and dK/dV kernels, all as Mosaic custom calls.
  assert compiled.as_text().count("tpu_custom_call") >= 3
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes > 0 and memory.generated_code_size_in_bytes > 0
  assert compiled.cost_analysis()["flops"] > 0


@pytest.mark.parametrize("dtype,blocks,head_dim", [
    (jnp.bfloat16, (64, 32), 96),
    (jnp.float32, (64, 32), 96),
    (jnp.bfloat16, (128, 128), 128),  # the tuning table's H200 blocks at its head dim
])
def test_triton_kernels_lower_for_cuda(dtype, blocks, head_dim):
  """Cross-platform lowering runs the whole Pallas -> Triton IR lowering (shape and op checks);
  only compiling that IR to PTX needs a GPU."""
  q = jax.ShapeDtypeStruct((2, 300, 4, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((2, 300, 2, head_dim), dtype)
  segment_ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)
  kernel = functools.partial(flash_attention, platform="gpu", block_q=blocks[0],
                             block_k=blocks[1])
  lowered = jax.jit(_forward_and_backward(kernel)).trace(q, kv, kv, segment_ids).lower(
      lowering_platforms=("cuda",))
  # Forward, dQ and dK/dV kernels.
  assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton") == 3


def _causal_query_block(kernel, q_length, kv_length, *, sharding=None, dtype=jnp.bfloat16,
                        heads=(4, 2), head_dim=128):
  """(step, abstract inputs): forward and backward of a causal query block of `q_length` rows
  against `kv_length` keys at per-row offsets, the masking a KV-cached AR decoder uses.
  `sharding`: NamedShardings of the "heads", "rows" and "batch" inputs, or None."""
  batch = 8 if sharding else 2
  place = lambda kind: sharding[kind] if sharding else None
  rows = lambda length, h: jax.ShapeDtypeStruct((batch, length, h, head_dim), dtype,
                                                sharding=place("heads"))
  ids = lambda length: jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=place("rows"))
  offsets = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=place("batch"))

  def step(q, k, v, q_ids, kv_ids, q_offset):
    masked = functools.partial(kernel, kv_segment_ids=kv_ids, causal=True, q_offset=q_offset)
    return _forward_and_backward(masked)(q, k, v, q_ids)
  inputs = (rows(q_length, heads[0]), rows(kv_length, heads[1]), rows(kv_length, heads[1]),
            ids(q_length), ids(kv_length), offsets)
  return step, inputs


@pytest.mark.libtpu
def test_causal_query_block_compiles_for_tpu():
  """The causal mask (iota against the scalar-prefetched offsets) and separate query/key
  lengths compile with Mosaic, sharded."""
  mesh = _compile_only_mesh("v5e:2x4")
  sharding = dict(heads=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)),
                  rows=NamedSharding(mesh, P(("data", "fsdp"), None)),
                  batch=NamedSharding(mesh, P(("data", "fsdp"))))
  step, inputs = _causal_query_block(
      shard_over_mesh(functools.partial(flash_attention, platform="tpu")), 256, LENGTH,
      sharding=sharding, heads=(Q_HEADS, KV_HEADS))
  with jax.set_mesh(mesh):
    compiled = jax.jit(step).lower(*inputs).compile()
  assert compiled.as_text().count("tpu_custom_call") >= 3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_causal_query_block_lowers_for_cuda(dtype):
  step, inputs = _causal_query_block(
      functools.partial(flash_attention, platform="gpu", block_q=64, block_k=32), 100, 300,
      dtype=dtype, head_dim=96)
  lowered = jax.jit(step).trace(*inputs).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton") == 3


# (batch, length, q heads, kv heads, head dim): lengths off the 128 blocks (padded rows), GQA
# ratios 1 to 8, head dims 64, 128 and 96 (zero-padded to 128). Which rows are packed, dense or
# padding is data the same lowered program reads at run time (its block schedule), so shapes
# are what lowering can vary; the values are tested on a GPU (test_flash.py).
MGPU_SHAPES = [(2, 300, 8, 2, 128), (1, 256, 4, 4, 64), (2, 200, 8, 1, 64), (1, 128, 2, 1, 96)]


@pytest.mark.parametrize("shape", MGPU_SHAPES, ids=lambda s: "B{}_L{}_H{}/{}_D{}".format(*s))
def test_mosaic_gpu_kernels_lower_for_cuda(shape):
  """Lowering runs the whole Pallas -> Mosaic GPU lowering: WGMMA operand layouts (tiling,
  swizzle, transposes), TMA shapes and the shared-memory budget are all checked here; only
  compiling to SASS and running needs a Hopper GPU."""
  batch, length, q_heads, kv_heads, head_dim = shape
  q = jax.ShapeDtypeStruct((batch, length, q_heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  kernel = functools.partial(flash_attention, platform="mosaic_gpu")
  forward = jax.jit(kernel).trace(q, kv, kv, segment_ids).lower(lowering_platforms=("cuda",))
  grads = jax.jit(jax.grad(lambda *args: jnp.sum(kernel(*args).astype(jnp.float32)),
                           argnums=(0, 1, 2)))
  backward = grads.trace(q, kv, kv, segment_ids).lower(lowering_platforms=("cuda",)).as_text()

  assert forward.as_text().count("custom_call @mosaic_gpu") == 1
  # jax.grad through the custom VJP: the forward (for lse), dQ and dK/dV kernels, no Triton.
  assert backward.count("custom_call @mosaic_gpu") == 3
  assert "triton" not in backward
  for name in ("flash_attention_mgpu_fwd", "flash_attention_mgpu_dq", "flash_attention_mgpu_dkv"):
    assert name in backward


def test_mosaic_gpu_lowering_checks_shared_memory():
  """The check above has teeth: blocks whose pipeline outgrows Hopper's shared memory fail
  (256 x 256 blocks lower at head dim 64, not at 128)."""
  q = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
  kernel = functools.partial(flash_attention, platform="mosaic_gpu", block_q=256, block_k=256)
  lower = lambda x: jax.jit(kernel).trace(x, x, x, segment_ids).lower(lowering_platforms=("cuda",))
  with pytest.raises(ValueError, match="exceeds available shared memory"):
    lower(q)
  assert "custom_call @mosaic_gpu" in lower(q.update(shape=(1, 512, 2, 64))).as_text()
