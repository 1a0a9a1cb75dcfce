"""Parameters are really sharded as the rules table says, and sharding never changes values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from omnijax import sharding
from omnijax.config import CONFIG_ROOT, MeshConfig, load_config
from omnijax.model.build import create_model


def tiny_config():
  return load_config(CONFIG_ROOT / "model" / "tiny.yaml").model


@pytest.fixture(scope="module")
def reference():
  config = tiny_config()
  model = create_model(config, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 1000, size=(8, 16)).astype(np.int32)
  segment_ids = np.repeat(np.array([[1] * 9 + [2] * 5 + [0] * 2]), 8, axis=0).astype(np.int32)
  return config, np.asarray(model(jnp.asarray(tokens), jnp.asarray(segment_ids))), tokens, \
      segment_ids


def _shard_shape(shape, spec, mesh):
  out = list(shape)
  for dim, axes in enumerate(spec):
    for axis in (axes,) if isinstance(axes, str) else (axes or ()):
      out[dim] //= mesh.shape[axis]
  return tuple(out)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 8, 1), (1, 1, 8)])
def test_sharded_params_and_forward(reference, shape):
  config, expected, tokens, segment_ids = reference
  mesh = sharding.make_mesh(MeshConfig(*shape))
  model = create_model(config, mesh, seed=0)  # same seed: same values, created sharded
  state = nnx.state(model)
  q_kernel = state["layers"]["self_attn"]["q_proj"]["kernel"][...]
  embed = state["embed_tokens"][...]
  data, fsdp, tensor = shape
  # The layout written out by hand (not read back from the rules table): matrices over fsdp x
  # tensor, heads and the MLP over tensor, norms replicated.
  assert q_kernel.sharding.spec == P(None, "fsdp" if fsdp > 1 else None,
                                     "tensor" if tensor > 1 else None)
  shard_shapes = {path: {s.data.shape for s in state[path[0]][path[1]][path[2]][path[3]][...]
                         .addressable_shards}
                  for path in [("layers", "self_attn", "q_proj", "kernel"),
                               ("layers", "self_attn", "k_proj", "kernel"),
                               ("layers", "mlp", "up_proj", "kernel"),
                               ("layers", "mlp", "down_proj", "kernel")]}
  assert shard_shapes == {
      ("layers", "self_attn", "q_proj", "kernel"): {(2, 64 // fsdp, 64 // tensor)},
      ("layers", "self_attn", "k_proj", "kernel"): {(2, 64 // fsdp, 32 // tensor)},
      ("layers", "mlp", "up_proj", "kernel"): {(2, 64 // fsdp, 128 // tensor)},
      ("layers", "mlp", "down_proj", "kernel"): {(2, 128 // tensor, 64 // fsdp)}}
  norm = state["layers"]["input_layernorm"]["scale"][...]
  assert {s.data.shape for s in norm.addressable_shards} == {(2, 64)}
  assert {s.data.shape for s in embed.addressable_shards} == {(1152 // tensor, 64 // fsdp)}
  for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    array = variable.get_value()
    spec = sharding.logical_to_spec(variable.get_metadata()["logical_axes"], mesh)
    assert {s.data.shape for s in array.addressable_shards} == {
        _shard_shape(array.shape, spec, mesh)}
  if fsdp > 1:
    sharding.assert_sufficiently_sharded(state, mesh)
  batch_sharding = jax.NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), mesh))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda t, s: model(t, s))(jax.device_put(tokens, batch_sharding),
                                            jax.device_put(segment_ids, batch_sharding))
  batch_axes = tuple(axis for axis, size in zip(("data", "fsdp"), shape[:2]) if size > 1)
  expected_sharding = jax.NamedSharding(mesh, P(batch_axes or None, None,
                                                "tensor" if tensor > 1 else None))
  assert out.sharding.is_equivalent_to(expected_sharding, out.ndim)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def test_rules_drop_axes_of_size_one_and_never_reuse_an_axis():
  mesh = sharding.make_mesh(MeshConfig(2, 4, 1))
  assert sharding.logical_to_spec(("batch", "length", "act_vocab"), mesh) == P(("data", "fsdp"),
                                                                               None, None)
  assert sharding.logical_to_spec(("embed", "embed")) == P("fsdp", None)
  with pytest.raises(KeyError, match="no entry in omnijax.sharding.RULES"):
    sharding.logical_to_spec(("nonsense",))


def test_an_axis_that_does_not_divide_its_dimension_moves_to_one_it_divides():
  mesh = jax.sharding.AbstractMesh((1, 32, 2), ("data", "fsdp", "tensor"))
  # 560 is not a multiple of 32: fsdp moves to the largest dimension it divides.
  assert sharding.logical_to_spec(("speech_features", "heads"), mesh, (560, 512)) == P(
      None, ("tensor", "fsdp"))
  assert sharding.logical_to_spec(("speech_features", "heads"), mesh, (560, 64)) == P(
      None, ("tensor", "fsdp"))
  assert sharding.logical_to_spec(("layers", "speech_features", "mlp"), mesh,
                                  (64, 560, 6)) == P("fsdp", None, "tensor")
  # With no dimension it divides, the axis stays off the array; divisible shapes are unchanged.
  assert sharding.logical_to_spec(("speech_queries", "speech_features"), mesh, (16, 560)) == P(
      None, None)
  assert sharding.logical_to_spec(("embed", "mlp"), mesh, (64, 128)) == P("fsdp", "tensor")
  # Without a shape (activations) the table alone decides.
  assert sharding.logical_to_spec(("speech_features",), mesh) == P("fsdp")


def test_replication_check_fails_when_too_much_is_replicated():
  mesh = sharding.make_mesh(MeshConfig(1, 8, 1))
  _, state = nnx.split(create_model(tiny_config(), mesh))
  fraction = sharding.replicated_fraction(state, mesh)
  assert 0 < fraction < 0.02  # only the RMSNorm scales are replicated
  with pytest.raises(AssertionError, match="replicated on mesh"):
    sharding.assert_sufficiently_sharded(state, mesh, tolerance=fraction / 2)
  # A mesh without FSDP has nothing to check.
  sharding.assert_sufficiently_sharded(state, sharding.make_mesh(MeshConfig(8, 1, 1)),
                                       tolerance=0.0)
