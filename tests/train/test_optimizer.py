"""Stage schedules joined over the global step, and per-stage freezing."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from omnijax.config import CONFIG_ROOT, ConfigError, StageConfig, TrainConfig, load_config
from omnijax.model.build import create_model
from omnijax.sharding import path_str
from omnijax.train import optimizer


def test_cosine_stage_warms_up_then_decays_to_the_end_ratio():
  schedule = optimizer.stage_schedule(StageConfig(steps=100, peak_lr=1.0, warmup_steps=10,
                                                  decay="cosine", end_lr_ratio=0.1))
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(55)) == pytest.approx(0.55, abs=0.01)  # cosine midpoint
  assert float(schedule(100)) == pytest.approx(0.1)


def test_wsd_stage_is_stable_then_decays_linearly():
  schedule = optimizer.stage_schedule(StageConfig(steps=100, peak_lr=2.0, warmup_steps=0,
                                                  decay="wsd", decay_fraction=0.2,
                                                  end_lr_ratio=0.0))
  assert [float(schedule(s)) for s in (0, 50, 80)] == [2.0, 2.0, 2.0]
  assert float(schedule(90)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.0)


def test_global_schedule_restarts_each_stage_at_its_first_step():
  train = TrainConfig(stages={
      "stage1": StageConfig(steps=10, peak_lr=1.0, warmup_steps=5, decay="constant"),
      "stage2": StageConfig(steps=10, peak_lr=0.5, warmup_steps=5, decay="constant")})
  schedule = optimizer.global_schedule(train)
  assert optimizer.stage_boundaries(train) == [("stage1", 0, 10), ("stage2", 10, 20)]
  assert [float(schedule(s)) for s in (5, 9, 10, 15, 19)] == pytest.approx(
      [1.0, 1.0, 0.0, 0.5, 0.5])


def test_frozen_parameters_get_no_update_and_clipping_sees_only_trainable():
  model = create_model(load_config(CONFIG_ROOT / "model" / "tiny.yaml").model)
  params = nnx.to_pure_dict(nnx.state(model))
  labels = optimizer.trainable_labels(params, StageConfig(trainable=("layers/mlp/.*", "lm_head")))
  flat = {path_str(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}
  assert flat["lm_head"] == "train" and flat["layers/mlp/up_proj/kernel"] == "train"
  assert flat["embed_tokens"] == "frozen" and flat["layers/self_attn/q_proj/kernel"] == "frozen"
  tx = optimizer.make_optimizer(load_config(None).train.optimizer, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  updates = {path_str(p): u for p, u in jax.tree_util.tree_leaves_with_path(updates)}
  assert float(jnp.abs(updates["embed_tokens"]).max()) == 0.0
  assert float(jnp.abs(updates["lm_head"]).min()) > 0.0


def test_stage_mistakes_name_the_stage(tmp_path):
  with pytest.raises(ConfigError, match=r"train.stages.stage2: stage steps=0"):
    load_config(CONFIG_ROOT / "experiments" / "toy.yaml", ["train.stages.stage2.steps=0"])
  with pytest.raises(ConfigError, match="unknown config key train.stages.stage1.stepz"):
    load_config(CONFIG_ROOT / "experiments" / "toy.yaml", ["train.stages.stage1.stepz=3"])


def test_the_three_stages_add_tasks_in_the_published_order():
  stages = load_config(CONFIG_ROOT / "experiments" / "toy.yaml").train.ordered_stages
  tasks = [set(stage.mixture) for _, stage in stages]
  assert [name for name, _ in stages] == ["stage1", "stage2", "stage3"]
  assert tasks[0] == {"t2i", "caption", "vqa"}
  assert tasks[1] == tasks[0] | {"asr", "tts"}
  assert tasks[2] == tasks[1] | {"s2i", "svqa"}


def test_muon_orthogonalises_each_layer_s_kernels_and_leaves_the_rest_to_adamw():
  model = create_model(load_config(CONFIG_ROOT / "model" / "tiny.yaml").model)  # scanned layers
  params = nnx.to_pure_dict(nnx.state(model))
  labels = optimizer.trainable_labels(params, StageConfig())
  tx = optimizer.make_optimizer(
      load_config(None, ["train.optimizer.kind=muon", "train.optimizer.clip_norm=1e9"])
      .train.optimizer, labels)
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  updates = {path_str(p): u for p, u in jax.tree_util.tree_leaves_with_path(updates)}
  grads = {path_str(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  kernel = updates["layers/mlp/up_proj/kernel"]
  assert kernel.ndim == 3  # [layers, in, out]
  for layer in range(kernel.shape[0]):
    # Orthogonalised: the singular values of a random gradient's update lie close together
    # (Newton-Schulz's five steps leave them within about [0.7, 1.2]); a raw gradient's spread.
    singular = jnp.linalg.svd(kernel[layer], compute_uv=False)
    raw = jnp.linalg.svd(grads["layers/mlp/up_proj/kernel"][layer], compute_uv=False)
    assert float(singular.max() / singular.min()) < 2.0 < float(raw.max() / raw.min())
    # Scaled to AdamW's update size.
    assert float(jnp.sqrt(jnp.mean(kernel[layer] ** 2))) == pytest.approx(
        optimizer.MUON_UPDATE_RMS, rel=0.3)
  # Embeddings, lm_head, norms: (Nesterov) Adam's first step, the same size for every element
  # and the gradient's sign.
  for name in ("embed_tokens", "lm_head", "norm/scale"):
    magnitude = jnp.abs(updates[name])
    assert float(magnitude.max() - magnitude.min()) < 2e-2 * float(magnitude.max())  # eps aside
    assert bool((jnp.sign(updates[name]) == jnp.sign(grads[name])).all())


def test_an_unknown_optimizer_is_refused_naming_the_key():
  with pytest.raises(ConfigError, match="train.optimizer.kind='sgd'"):
    load_config(None, ["train.optimizer.kind=sgd"])
