"""`get_attention`: the kernel backends, jitted and sharded on the 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kernel_segments import random_segment_ids
from omnijax.config import ATTENTION_BACKENDS
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
