"""The training program: mesh -> state layout -> optimizer -> jitted, sharded train step.

`build_train_program` is the one place this chain is assembled; `omnijax train`, `omnijax
compile`, the benchmarks and the tests all call it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import optax

from omnijax.config import Config, ConfigError
from omnijax.sharding import make_mesh
from omnijax.train.optimizer import global_schedule
from omnijax.train.state import StateLayout
from omnijax.train.step import (TrainState, batch_sharding, check_batch_fits_mesh, jit_train_step,
                                make_train_step)

@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """One stage's jitted, sharded train step and the layout of the state it updates."""

  mesh: jax.sharding.Mesh
  layout: StateLayout
  stage: str
  tx: optax.GradientTransformation
  shardings: TrainState
  # (state, batch) -> (state, metrics); the state is donated (updated in place).
  step: Callable

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return batch_sharding(self.mesh)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: a restore target, or the AOT compiler's input."""
    return self.layout.abstract_state(self.tx)

  def init_state(self, params, step) -> TrainState:
    """State from parameters (already on the mesh) with a fresh optimizer state."""
    init_opt = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)
    return TrainState(params, init_opt(params), jax.device_put(step, self.layout.replicated))


def build_train_program(config: Config, stage: str | None = None, *,
                        mesh: jax.sharding.Mesh | None = None,
                        layout: StateLayout | None = None) -> TrainProgram:
  """The train step of `stage` (default: the first) on `mesh` (default: `config.mesh` over all
  devices). Pass `layout` to reuse one already built for this mesh (it is stage-independent)."""
  mesh = make_mesh(config.mesh) if mesh is None else mesh
  check_batch_fits_mesh(config, mesh)
  stages = config.train.ordered_stages
  if not stages:
    raise ConfigError("train.stages is empty: configure at least one stage")
  stage_name = config.train.resolve_stage(stage) if stage else stages[0][0]
  layout = StateLayout.create(config, mesh) if layout is None else layout
  tx = layout.optimizer(config, config.train.stages[stage_name])
  shardings = layout.shardings(tx)
  step = jit_train_step(make_train_step(config, layout.graphdef, tx, global_schedule(config.train),
                                        layout.trainable(config.train.stages[stage_name])),
                        shardings, mesh)
  return TrainProgram(mesh, layout, stage_name, tx, shardings, step)
