"""The analytic minimum of per-chip memory, checked against a hand count."""

import dataclasses
import pathlib

import jax

from omnijax.config import MeshConfig, load_config
from omnijax.podfit.memory import analytic_minimum, kept_per_token
from omnijax.sharding import make_mesh

TINY = pathlib.Path(__file__).parents[1] / "train" / "tiny_experiment.yaml"


def test_state_is_divided_over_shards_and_frozen_parameters_carry_no_optimizer_state():
  # tiny: d 64, 4 heads x 16, 2 kv heads, mlp 128, 2 layers, 1152 embedding rows (padded), untied,
  # with the toy recipe's query/key norms (16 each).
  config = load_config(TINY, ["train.grad_accum_steps=2",
                              "train.stages.stage2.trainable=[layers/mlp/.*]"])
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  full, partial = analytic_minimum(config, mesh, "stage1"), analytic_minimum(config, mesh, "stage2")
  d, f, v, layers = 64, 128, 1152, 2
  # Matrices are split over fsdp x tensor (4); biases over tensor (2); norms are replicated.
  matrices = v * d * 2 + layers * (d * 64 + 2 * d * 32 + 64 * d + 3 * d * f)
  biases, norms = layers * (64 + 2 * 32), layers * 2 * d + d + layers * 2 * 16
  per_chip = matrices / 4 + biases / 2 + norms
  assert full.params_per_chip == per_chip == config.model.param_count() - 3 * (matrices / 4) - (
      biases / 2)
  # The toy recipe's Muon keeps one fp32 momentum for each projection kernel (parameter,
  # gradient, momentum: 12 bytes) and AdamW's two moments for the rest (16 bytes).
  assert config.train.optimizer.kind == "muon"
  kernels = layers * (d * 64 + 2 * d * 32 + 64 * d + 3 * d * f) / 4
  assert full.state_bytes == 16 * (per_chip - kernels) + 12 * kernels
  mlp = layers * 3 * d * f / 4
  assert partial.state_bytes == 4 * per_chip + 8 * mlp
  adamw = load_config(TINY, ["train.grad_accum_steps=2", "train.optimizer.kind=adamw",
                             "train.stages.stage2.trainable=[layers/mlp/.*]"])
  assert analytic_minimum(adamw, mesh, "stage1").state_bytes == 16 * per_chip
  assert analytic_minimum(adamw, mesh, "stage2").state_bytes == 4 * per_chip + 12 * mlp
  # Full remat keeps each layer's input: 8 rows / 2 micro-batches / 4 batch shards = 1 row per chip.
  assert config.model.remat == "none" and config.model.compute_dtype == "float32"
  # No remat keeps, per token and layer with tensor 2: the input (64), q/k/v (64 + 32 + 32) / 2,
  # o_proj out (64), gate and up (2 x 128 / 2), down out (64), attention out (64 / 2), the MLP
  # hidden state (128 / 2) = 480 values.
  assert full.activation_bytes == layers * 1 * 192 * 480 * 4
  remat_full = load_config(TINY, ["train.grad_accum_steps=2", "model.remat=full"])
  assert analytic_minimum(remat_full, mesh, "stage1").activation_bytes == layers * 192 * d * 4


def test_policies_keep_more_the_less_they_recompute():
  model = load_config(TINY).model
  kept = [kept_per_token(dataclasses.replace(model, remat=policy), 1)
          for policy in ("full", "save_attention_out", "save_dots_except_mlp", "save_dots", "none")]
  # By hand (d 64, q 64, k and v 32 each, mlp 128, tensor 1): the input 64; + attention out 64;
  # + q/k/v 128 + o_proj out 64; + q/k/v 128 + o_proj 64 + gate/up 256 + down 64; + attention
  # out 64 + MLP hidden 128.
  assert kept == [64, 128, 320, 576, 768]
