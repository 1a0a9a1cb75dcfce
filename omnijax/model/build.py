"""Creating models: abstract (no memory), initialised on a mesh, or filled from given arrays."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx

from omnijax.config import ModelConfig
from omnijax.model.transformer import Transformer
from omnijax.sharding import path_str, state_shardings


# A module constructor taking only its random number streams, e.g. `lambda rngs: Transformer(
# config, rngs)`: the functions below build any omnijax module (backbone, speech encoder) alike.
Create = Callable[[nnx.Rngs], nnx.Module]
Read = Callable[[tuple[str, ...], tuple], np.ndarray]


def abstract_module(create: Create) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and shape-only state (ShapeDtypeStructs); allocates nothing."""
  return nnx.split(nnx.eval_shape(lambda: create(nnx.Rngs(params=0))))


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  return abstract_module(lambda rngs: Transformer(config, rngs))


def create_module(create: Create, mesh: jax.sharding.Mesh | None = None,
                  seed: int = 0) -> nnx.Module:
  """A randomly initialised module; with a mesh, every parameter is created already sharded."""
  if mesh is None:
    return create(nnx.Rngs(params=seed))
  graphdef, abstract_state = abstract_module(create)
  shardings = state_shardings(abstract_state, mesh)
  init = jax.jit(lambda: nnx.state(create(nnx.Rngs(params=seed))), out_shardings=shardings)
  with jax.set_mesh(mesh):
    return nnx.merge(graphdef, init())


def create_model(config: ModelConfig, mesh: jax.sharding.Mesh | None = None,
                 seed: int = 0) -> Transformer:
  return create_module(lambda rngs: Transformer(config, rngs), mesh, seed)


def model_from_arrays(config: ModelConfig, read: Read,
                      mesh: jax.sharding.Mesh | None = None) -> Transformer:
  return module_from_arrays(lambda rngs: Transformer(config, rngs), read, mesh)


def module_from_arrays(create: Create, read: Read,
                       mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """Builds a module parameter by parameter: `read(path, shape)` returns one host array.

  Each array goes straight to its (sharded) device buffers before the next is read, so a large
  checkpoint never needs two full copies in host memory.
  """
  graphdef, abstract_state = abstract_module(create)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  if mesh is None:
    # Host memory: a 7B model in fp32 does not fit one accelerator, and conversion needs none.
    host = jax.local_devices(backend="cpu")[0]
    shardings = jax.tree.map(lambda _: host, abstract_state, is_leaf=is_variable)
  else:
    shardings = state_shardings(abstract_state, mesh)

  def fill(path, variable, sharding):
    keys = tuple(path_str(path).split("/"))
    expected = variable.get_value()
    array = read(keys, tuple(expected.shape))
    if tuple(array.shape) != tuple(expected.shape):
      raise ValueError(f"parameter {'/'.join(keys)}: got shape {tuple(array.shape)}, "
                       f"expected {tuple(expected.shape)}")
    return variable.replace(jax.device_put(np.asarray(array, dtype=expected.dtype), sharding))

  state = jax.tree_util.tree_map_with_path(fill, abstract_state, shardings, is_leaf=is_variable)
  return nnx.merge(graphdef, state)
