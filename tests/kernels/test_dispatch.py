"""`get_attention`: the kernel backends, jitted and sharded on the 8-device CPU mesh, and the
refusals of the cases a backend lacks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kernel_segments import random_segment_ids
from omnijax.config import ATTENTION_BACKENDS
from omnijax.kernels import flash_attention, splash_attention
from omnijax.kernels.attention import get_attention
from omnijax.kernels.reference import xla_attention


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)


def _sharded_inputs(mesh):
  batch, length, q_heads, kv_heads, head_dim = 4, 160, 4, 2, 32
  rng = np.random.default_rng(0)
  heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  normal = lambda h: jax.device_put(
      jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), jnp.float32), heads)
  segment_ids = jax.device_put(jnp.asarray(random_segment_ids(rng, batch, length, 4)),
                               NamedSharding(mesh, P(("data", "fsdp"), None)))
  return normal(q_heads), normal(kv_heads), normal(kv_heads), segment_ids, normal(q_heads)


def _loss_and_grads(attention, mesh, q, k, v, segment_ids, weights):
  def loss(q, k, v):
    out = attention(q, k, v, segment_ids)
    return jnp.sum(out * weights), out

  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return step(q, k, v), step.lower(q, k, v).as_text()


@pytest.mark.parametrize("backend", ["pallas", "splash"])
def test_sharded_kernel_matches_xla(mesh, backend):
  inputs = _sharded_inputs(mesh)
  ((_, out), grads), hlo = _loss_and_grads(get_attention(backend), mesh, *inputs)
  ((_, ref_out), ref_grads), _ = _loss_and_grads(xla_attention, mesh, *inputs)

  assert "sdy.manual_computation" in hlo  # shard_map: the kernel really runs per shard
  assert out.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
  np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
  for grad, ref_grad in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref_grad, atol=1e-4, rtol=0)


def test_backend_names_and_cudnn_needs_a_gpu():
  assert set(ATTENTION_BACKENDS) == {"xla", "pallas", "splash", "cudnn", "mosaic_gpu", "auto"}
  assert get_attention("xla") is xla_attention
  q = jnp.zeros((1, 8, 2, 16))
  segment_ids = jnp.ones((1, 8), jnp.int32)
  # The variant is chosen when the call is traced, for the platform it is traced on.
  with pytest.raises(ValueError, match="needs a GPU, but the platform is 'cpu'"):
    get_attention("cudnn")(q, q, q, segment_ids)
  with pytest.raises(ValueError, match="not one of"):
    get_attention("flash")


def _sharded_query_block(mesh, q, k, v, segment_ids, weights):
  """Rows 40..103 of each row as a query block against the whole row's K/V, at per-row
  offsets sharded over the batch like the rows."""
  offset, rows = 40, 64
  block = lambda x: x[:, offset:offset + rows]
  offsets = jax.device_put(jnp.full((q.shape[0],), offset, jnp.int32),
                           NamedSharding(mesh, P(("data", "fsdp"))))
  return (block(q), k, v, block(segment_ids), block(weights),
          dict(kv_segment_ids=segment_ids, q_offset=offsets))


@pytest.mark.parametrize("backend,case", [("pallas", "causal query block"),
                                          ("splash", "causal")])
def test_sharded_kernel_masking_matches_xla(mesh, backend, case):
  q, k, v, segment_ids, weights = _sharded_inputs(mesh)
  masking = {}
  if case == "causal query block":
    q, k, v, segment_ids, weights, masking = _sharded_query_block(mesh, q, k, v, segment_ids,
                                                                  weights)
  inputs = (q, k, v, segment_ids, weights)
  attention = functools.partial(get_attention(backend), causal=True, **masking)
  ((_, out), grads), hlo = _loss_and_grads(attention, mesh, *inputs)
  reference = functools.partial(xla_attention, causal=True, **masking)
  ((_, ref_out), ref_grads), _ = _loss_and_grads(reference, mesh, *inputs)

  assert "sdy.manual_computation" in hlo
  np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
  for grad, ref_grad in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref_grad, atol=1e-4, rtol=0)
  # The masking reached the kernel: bidirectional attention differs.
  ((_, plain), _), _ = _loss_and_grads(functools.partial(xla_attention, **masking), mesh, *inputs)
  assert float(jnp.max(jnp.abs(plain - out))) > 1e-2


def test_auto_on_cpu_passes_the_masking_to_xla():
  q = jax.random.normal(jax.random.key(0), (2, 32, 2, 16))
  segment_ids = jnp.ones((2, 32), jnp.int32)
  np.testing.assert_array_equal(get_attention("auto")(q, q, q, segment_ids, causal=True),
                                xla_attention(q, q, q, segment_ids, causal=True))


def test_backends_refuse_the_cases_they_lack_in_one_line():
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  segment_ids = jnp.ones((1, 128), jnp.int32)
  cached = r"a query block against separate \(cached\) keys \(kv_segment_ids / q_offset\)"
  refusals = [
      (functools.partial(get_attention("splash"), kv_segment_ids=segment_ids),
       f"attention='splash' does not support {cached}; use 'pallas' or 'xla'"),
      (functools.partial(splash_attention, q_offset=3, interpret=True),
       f"attention='splash' does not support {cached}"),
      (functools.partial(flash_attention, platform="mosaic_gpu", causal=True),
       "attention='mosaic_gpu' does not support causal masking; use 'pallas' or 'xla'"),
      (functools.partial(flash_attention, platform="mosaic_gpu", causal=True,
                         kv_segment_ids=segment_ids),
       f"attention='mosaic_gpu' does not support causal masking nor {cached}"),
  ]
  for attention, message in refusals:
    with pytest.raises(ValueError, match=f"^{message}") as error:
      attention(q, q, q, segment_ids)
    assert "\n" not in str(error.value)
