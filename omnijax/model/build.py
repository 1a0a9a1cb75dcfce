"""Creating models: abstract (no memory), initialised on a mesh, or filled from given arrays."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx

from omnijax.config import ModelConfig
from omnijax.model.transformer import Transformer
from omnijax.sharding import path_str, state_shardings


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and shape-only state (ShapeDtypeStructs); allocates nothing."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(params=0))))


def create_model(config: ModelConfig, mesh: jax.sharding.Mesh | None = None,
                 seed: int = 0) -> Transformer:
  """A randomly initialised model; with a mesh, every parameter is created already sharded."""
  if mesh is None:
    return Transformer(config, nnx.Rngs(params=seed))
  graphdef, abstract_state = abstract_model(config)
  shardings = state_shardings(abstract_state, mesh)
  init = jax.jit(lambda: nnx.state(Transformer(config, nnx.Rngs(params=seed))),
                 out_shardings=shardings)
  with jax.set_mesh(mesh):
    return nnx.merge(graphdef, init())


def model_from_arrays(config: ModelConfig, read: Callable[[tuple[str, ...], tuple], np.ndarray],
                      mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Builds a model parameter by parameter: `read(path, shape)` returns one host array.

  Each array goes straight to its (sharded) device buffers before the next is read, so a large
  checkpoint never needs two full copies in host memory.
  """
  graphdef, abstract_state = abstract_model(config)
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
