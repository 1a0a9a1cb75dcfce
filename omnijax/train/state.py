"""The shapes and shardings of the training state, without allocating it (for init, restore
onto any mesh, and ahead-of-time compilation)."""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx

from omnijax.config import Config, ConfigError, StageConfig
from omnijax.model.build import abstract_model
from omnijax.sharding import assert_sufficiently_sharded, state_shardings
from omnijax.train.optimizer import make_optimizer, trainable_labels
from omnijax.train.step import TrainState


@dataclasses.dataclass(frozen=True)
class StateLayout:
  graphdef: nnx.GraphDef
  abstract_params: dict  # pure dict of ShapeDtypeStructs
  param_shardings: dict  # pure dict of NamedShardings
  replicated: jax.sharding.NamedSharding

  @classmethod
  def create(cls, config: Config, mesh: jax.sharding.Mesh) -> StateLayout:
    graphdef, abstract_state = abstract_model(config.model)
    assert_sufficiently_sharded(abstract_state, mesh)
    shardings = jax.tree.map(lambda variable, sharding: variable.replace(sharding),
                             abstract_state, state_shardings(abstract_state, mesh),
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    return cls(graphdef, nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings),
               jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def trainable(self, stage: StageConfig) -> dict:
    """'train' or 'frozen' per parameter in `stage`."""
    return trainable_labels(self.abstract_params, stage)

  def optimizer(self, config: Config, stage: StageConfig) -> optax.GradientTransformation:
    return make_optimizer(config.train.optimizer, self.trainable(stage))

  def shardings(self, tx: optax.GradientTransformation) -> TrainState:
    """Optimizer moments are sharded like their parameters; counters are replicated. Frozen
    parameters have no moments: their place holds an empty optax.MaskedNode, kept as is."""
    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_shardings = optax.tree_map_params(
        tx, lambda moment, sharding: moment if is_masked(moment) else sharding,
        jax.eval_shape(tx.init, self.abstract_params), self.param_shardings,
        transform_non_params=lambda _: self.replicated, is_leaf=is_masked)
    return TrainState(self.param_shardings, opt_shardings, self.replicated)

  def checkpoint_target(self, config: Config, meta: dict) -> TrainState:
    """The abstract state of the checkpoint described by `meta` (its stage's optimizer)."""
    if meta["stage"] not in config.train.stages:
      raise ConfigError(f"the checkpoint at step {meta['step']} was written by stage "
                        f"{meta['stage']!r}, which train.stages no longer defines")
    return self.abstract_state(self.optimizer(config, config.train.stages[meta["stage"]]))

  def abstract_state(self, tx: optax.GradientTransformation) -> TrainState:
    shapes = TrainState(self.abstract_params, jax.eval_shape(tx.init, self.abstract_params),
                        jax.ShapeDtypeStruct((), "int32"))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.shardings(tx))
