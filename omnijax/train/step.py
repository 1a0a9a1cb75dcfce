"""The jitted, sharded train step: masking, loss, gradient accumulation, clipping, AdamW."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from omnijax.config import Config, ConfigError
from omnijax.diffusion import objective
from omnijax.model.speech import SPEECH_INPUTS
from omnijax.sharding import logical_to_spec, shard_count


@dataclasses.dataclass
class TrainState:
  """Everything a step changes; a pytree so it can be donated, sharded and checkpointed."""

  params: Any  # nnx.State of the model's Params
  opt_state: Any
  step: jax.Array  # global step, int32 scalar


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "opt_state", "step"],
                                 meta_fields=[])


def make_train_step(config: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, trainable: Any) -> Callable:
  """(state, batch) -> (state, metrics); jit it with shardings (see `jit_train_step`).

  `trainable` ('train' / 'frozen' per parameter, the labels `tx` was built with) decides which
  gradients `grad_norm` reports: those the optimizer uses; frozen parameters enter the model
  behind stop_gradient, so no backward pass runs for them (nor through a frozen speech encoder).
  A batch carrying `SPEECH_INPUTS` (speech_features, speech_lengths) feeds them to the model.
  """
  train, vocab = config.train, config.model.vocab.build()
  accum = train.grad_accum_steps
  micro_batch = config.data.global_batch_size // accum

  training_objective = objective.get_objective(train.objective.kind)

  def micro_sums(params, batch, step, row_offset):
    def loss_fn(params):
      corruption = training_objective.corrupt(batch, train.objective, vocab, train.seed, step,
                                              row_offset)
      model = nnx.merge(graphdef, jax.tree.map(
          lambda p, label: p if label == "train" else jax.lax.stop_gradient(p), params,
          trainable))
      speech = {name: batch[name] for name in SPEECH_INPUTS if name in batch}
      hidden = model.hidden_states(corruption.inputs, batch["segment_ids"], batch["positions"],
                                   causal=training_objective.causal, **speech)
      sums = objective.loss_sums(hidden, model.output_head(), batch, corruption, train.objective)
      denominator = sums["denominator"]
      if train.grad_accum_reduction == "sum_of_means":
        # Release reproduction: each micro-batch contributes its own mean.
        return sums["loss_sum"] / jnp.maximum(denominator, 1.0), sums
      return sums["loss_sum"], sums

    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, sums

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    if accum == 1:
      grads, sums = micro_sums(state.params, batch, state.step, 0)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, micro_batch, *x.shape[1:]), batch)

      def body(carry, inputs):
        index, micro_batch_data = inputs
        grads, sums = micro_sums(state.params, micro_batch_data, state.step, index * micro_batch)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zero = jax.eval_shape(lambda: micro_sums(state.params, jax.tree.map(lambda x: x[0], micro),
                                               state.step, 0))
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
      (grads, sums), _ = jax.lax.scan(body, zero, (jnp.arange(accum), micro))

    if train.grad_accum_reduction == "token_mean":
      scale = 1.0 / jnp.maximum(sums["denominator"], 1.0)
      grads = jax.tree.map(lambda g: g * scale, grads)
      loss = sums["loss_sum"] * scale
    else:
      loss = sums["loss_sum"] / jnp.maximum(sums["denominator"], 1.0)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    learning_rate = schedule(state.step)
    params = optax.apply_updates(state.params,
                                 jax.tree.map(lambda u: -learning_rate * u, updates))
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(jax.tree.map(
            lambda g, label: g if label == "train" else None, grads, trainable)),
        "lr": learning_rate,
        "targets": sums["targets"],
        "task_loss": sums["task_loss_sum"] / jnp.maximum(sums["task_targets"], 1.0),
        "task_targets": sums["task_targets"],
        # The loss checks the weights that went into this step; this checks the ones it made.
        "params_finite": jnp.all(jnp.stack([jnp.isfinite(x).all()
                                            for x in jax.tree.leaves(params)])),
    }
    return TrainState(params, opt_state, state.step + 1), metrics

  return train_step


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh))


def check_batch_fits_mesh(config: Config, mesh) -> None:
  """Every micro-batch must split evenly over the mesh's batch shards."""
  shards = shard_count("batch", mesh)
  micro_batch = config.data.global_batch_size // config.train.grad_accum_steps
  if micro_batch % shards:
    raise ConfigError(f"data.global_batch_size={config.data.global_batch_size} / "
                      f"train.grad_accum_steps={config.train.grad_accum_steps} = {micro_batch} "
                      f"rows per micro-batch do not split over the mesh's {shards} batch shards "
                      f"(mesh {dict(mesh.shape)})")


def jit_train_step(step_fn: Callable, state_shardings: TrainState, mesh) -> Callable:
  """jit with NamedShardings in and out and the state donated (updated in place)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
