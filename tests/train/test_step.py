"""The train step: gradient accumulation, sharding and the attention backend change no numbers."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from train_helpers import tiny_config
from omnijax.config import MeshConfig
from omnijax.data.pipeline import Batches
from omnijax.model.build import create_model
from omnijax.diffusion import objective
from omnijax.sharding import make_mesh
from omnijax.train import flops
from omnijax.train.program import build_train_program


def one_batch(config):
  batches = Batches(config.data, config.model.vocab.build())
  batch = next(batches)
  batches.close()
  return batch


def run_step(config, batch, mesh=None, steps=1):
  """Runs `steps` train steps from the same initial weights; returns (params, metrics list).
  Without a mesh, on one device."""
  if mesh is None:
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  program = build_train_program(config, "stage1", mesh=mesh)
  model = create_model(config.model, mesh, seed=0)
  train_state = program.init_state(nnx.to_pure_dict(nnx.state(model)), np.int32(0))
  history = []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      train_state, metrics = program.step(train_state, batch)
      history.append(jax.device_get(metrics))
  return jax.device_get(train_state.params), history


def _max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_gradient_accumulation_equals_the_big_batch(toy_data):
  config = tiny_config(toy_data, "data.global_batch_size=8")
  batch = one_batch(config)
  big_params, big = run_step(config, batch, steps=2)
  accum = dataclasses.replace(config, train=dataclasses.replace(config.train, grad_accum_steps=4))
  acc_params, acc = run_step(accum, batch, steps=2)
  assert abs(big[1]["loss"] - acc[1]["loss"]) <= 1e-5
  assert abs(big[0]["grad_norm"] - acc[0]["grad_norm"]) <= 1e-5 * big[0]["grad_norm"]
  assert _max_diff(big_params, acc_params) <= 1e-5


def test_sum_of_means_reproduces_the_release_scaling(toy_data):
  config = tiny_config(toy_data, "data.global_batch_size=8", "train.grad_accum_steps=2",
                       "train.grad_accum_reduction=sum_of_means")
  batch = one_batch(config)
  _, history = run_step(config, batch)
  token_mean = tiny_config(toy_data, "data.global_batch_size=8", "train.grad_accum_steps=2")
  _, reference = run_step(token_mean, batch)
  # Two micro-batch means summed: about twice the gradient of the overall mean.
  ratio = history[0]["grad_norm"] / reference[0]["grad_norm"]
  assert 1.7 < ratio < 2.3
  assert history[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2)])
def test_sharded_step_equals_single_device(toy_data, shape):
  config = tiny_config(toy_data)
  batch = one_batch(config)
  single_params, single = run_step(config, batch, steps=2)
  mesh = make_mesh(MeshConfig(*shape))
  sharded_params, sharded = run_step(config, batch, mesh=mesh, steps=2)
  assert abs(single[1]["loss"] - sharded[1]["loss"]) <= 1e-5
  assert _max_diff(single_params, sharded_params) <= 1e-5


def test_sharded_muon_step_equals_single_device(toy_data):
  # Newton-Schulz runs on fsdp- and tensor-sharded kernels: the collectives XLA inserts must
  # give the single device's update.
  config = tiny_config(toy_data, "train.optimizer.kind=muon")
  batch = one_batch(config)
  single_params, single = run_step(config, batch, steps=2)
  sharded_params, sharded = run_step(config, batch, mesh=make_mesh(MeshConfig(1, 4, 2)), steps=2)
  assert abs(single[1]["loss"] - sharded[1]["loss"]) <= 1e-5
  assert _max_diff(single_params, sharded_params) <= 1e-5
  start = create_model(config.model, seed=0)
  assert _max_diff(single_params, nnx.to_pure_dict(nnx.state(start))) > 1e-3  # it moved


def test_pallas_attention_train_step_equals_xla(toy_data):
  config = tiny_config(toy_data, "data.seq_len=128", "data.global_batch_size=4")
  batch = one_batch(config)
  mesh = make_mesh(MeshConfig(2, 2, 2))
  xla_params, xla = run_step(config, batch, mesh=mesh, steps=2)
  pallas = dataclasses.replace(config, model=dataclasses.replace(config.model, attention="pallas"))
  pallas_params, pallas_metrics = run_step(pallas, batch, mesh=mesh, steps=2)
  assert abs(xla[1]["loss"] - pallas_metrics[1]["loss"]) <= 1e-5
  assert _max_diff(xla_params, pallas_params) <= 1e-5


def test_an_objective_that_asks_for_causal_attention_gets_it(toy_data, monkeypatch):
  # The seam an autoregressive objective uses: its `causal` reaches the model's attention. The
  # same masking with causal attention changes the loss; run alone, the objective's tokens see
  # only their past, so the loss must differ from the bidirectional one.
  config = tiny_config(toy_data, "model.num_layers=1")
  batch = one_batch(config)
  _, bidirectional = run_step(config, batch)

  class CausalOmni(objective.OmniMasking):
    causal = True

  monkeypatch.setitem(objective.OBJECTIVES, "omni", CausalOmni())
  _, causal = run_step(config, batch)
  assert bidirectional[0]["targets"] == causal[0]["targets"]  # the same masked tokens
  assert abs(float(bidirectional[0]["loss"]) - float(causal[0]["loss"])) > 1e-4


def test_analytic_flops_count_full_bidirectional_attention():
  from omnijax.config import CONFIG_ROOT, load_config
  model = load_config(CONFIG_ROOT / "model" / "omni7b.yaml").model
  matmul = flops.matmul_params(model)
  # Everything but the embedding gather and the (tiny) norms and biases is a matmul.
  assert 0.99 < matmul / (model.param_count() - model.vocab_size * model.hidden_size) < 1.0001
  # By hand: per layer q and o 3584^2 each, k and v 3584 x 512 each, the MLP 3 x 3584 x 18944
  # (233,046,016), x 28 layers, plus the lm_head 3584 x 176,264.
  assert matmul == 28 * 233_046_016 + 3584 * 176_264 == 7_157_018_624
  per_token = flops.training_flops_per_token(model, 3072)
  assert per_token == 6 * matmul + 12 * 28 * 3072 * 28 * 128 == 46_641_487_872
