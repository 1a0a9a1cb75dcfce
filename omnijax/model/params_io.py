"""Model weights on disk in omnijax's own format: an Orbax checkpoint plus the model config.

This is what `omnijax convert from-hf` writes and what training can start from; full training
checkpoints (optimizer, data iterator) live in omnijax.train.
"""

from __future__ import annotations

import os
import pathlib

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from omnijax.config import ConfigError, ModelConfig, from_dict, load_yaml, to_dict
from omnijax.files import atomic_write_text
from omnijax.model.build import abstract_model
from omnijax.model.transformer import Transformer
from omnijax.sharding import state_shardings

CONFIG_FILE = "model.yaml"
PARAMS_DIR = "params"


def save_model(model: Transformer, config: ModelConfig, directory: str | os.PathLike) -> None:
  directory = pathlib.Path(directory).resolve()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    # Orbax writes into a temporary directory and renames it when complete (atomic).
    checkpointer.save(directory / PARAMS_DIR, nnx.state(model, nnx.Param), force=True)
  atomic_write_text(directory / CONFIG_FILE,
                    yaml.safe_dump({"model": to_dict(config)}, sort_keys=False))


def load_model(directory: str | os.PathLike,
               mesh: jax.sharding.Mesh | None = None) -> tuple[ModelConfig, Transformer]:
  """Restores (config, model); with a mesh every parameter is restored directly sharded."""
  directory = pathlib.Path(directory).resolve()
  config_file = directory / CONFIG_FILE
  if not config_file.is_file():
    raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; not an omnijax model directory")
  tree = load_yaml(config_file.read_text(), str(config_file))
  if not isinstance(tree, dict) or "model" not in tree:
    raise ConfigError(f"{config_file}: expected a mapping with a 'model' section")
  try:
    config = from_dict(ModelConfig, tree["model"], "model")
  except ConfigError as e:
    raise ConfigError(f"{config_file}: {e}") from None
  graphdef, abstract_state = abstract_model(config)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    shardings = state_shardings(abstract_state, mesh)
  target = jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                  sharding=s)),
      abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(directory / PARAMS_DIR, target)
  return config, nnx.merge(graphdef, state)
