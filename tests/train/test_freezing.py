"""Stages that freeze part of the model, through the training loop: frozen parameters come out
bit-identical, have no optimizer state, survive checkpoints and resume, and `grad_norm` covers
the trainable parameters only."""

import jax
import numpy as np
import pytest
from flax import nnx

from train_helpers import tiny_config
from omnijax.model.build import create_model
from omnijax.sharding import make_mesh, path_str
from omnijax.train.checkpoints import Checkpoints
from omnijax.train.loop import train
from omnijax.train.metrics import read_metrics
from omnijax.train.state import StateLayout

# Stage 1 trains only the output head, stage 2 only the transformer layers.
FREEZING = ('train.stages.stage1.trainable=["lm_head"]',
            'train.stages.stage2.trainable=["layers/.*"]')


def flat(tree) -> dict:
  return {path_str(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def restore(config, workdir, step):
  """(params, opt_state) of checkpoint `step` of the run in `workdir`."""
  layout = StateLayout.create(config, make_mesh(config.mesh))
  checkpoints = Checkpoints(workdir / "checkpoints", keep=None, read_only=True)
  _, state, _, _ = checkpoints.restore(step, lambda meta: layout.checkpoint_target(config, meta))
  checkpoints.close()
  return flat(jax.device_get(state.params)), jax.device_get(state.opt_state)


def moments(opt_state) -> list[np.ndarray]:
  """The optimizer's per-parameter arrays (Adam's mu and nu), counters left out."""
  return [leaf for leaf in jax.tree.leaves(opt_state) if np.ndim(leaf) > 0]


@pytest.fixture(scope="module")
def frozen_run(toy_data, tmp_path_factory):
  """Stage 1, then stage 2 stopped at step 6 and resumed to its end (step 8); and the same
  eight steps uninterrupted."""
  config = tiny_config(toy_data, *FREEZING)
  resumed, straight = tmp_path_factory.mktemp("resumed"), tmp_path_factory.mktemp("straight")
  initial = flat(nnx.to_pure_dict(nnx.state(create_model(config.model, make_mesh(config.mesh),
                                                         seed=config.train.seed))))
  train(config, resumed, max_steps=6)
  train(config, resumed, max_steps=8)
  train(config, straight, max_steps=8)
  return (config, resumed, straight, initial, restore(config, resumed, 4),
          restore(config, resumed, 8))


def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state(frozen_run):
  _, _, _, initial, (stage1, stage1_opt), (stage2, stage2_opt) = frozen_run
  for name, value in initial.items():
    if name == "lm_head":
      assert not np.array_equal(stage1[name], value)
    else:
      np.testing.assert_array_equal(stage1[name], value, err_msg=name)
  # Two moments (mu, nu) of the one trainable parameter, nothing for the frozen ones.
  assert [m.shape for m in moments(stage1_opt)] == [initial["lm_head"].shape] * 2
  for name, value in stage1.items():
    if name.startswith("layers/"):
      assert not np.array_equal(stage2[name], value), name
    else:
      np.testing.assert_array_equal(stage2[name], value, err_msg=name)
  layer_shapes = sorted(v.shape for k, v in initial.items() if k.startswith("layers/"))
  assert sorted(m.shape for m in moments(stage2_opt)) == sorted(layer_shapes * 2)


def test_freezing_resumes_exactly(frozen_run):
  _, resumed, straight, *_ = frozen_run
  losses = lambda workdir: {r["step"]: r["loss"] for r in read_metrics(workdir)}
  assert sorted(losses(resumed)) == list(range(1, 9))
  assert losses(resumed) == losses(straight)


def test_grad_norm_covers_the_trainable_parameters_only(frozen_run, toy_data, tmp_path):
  """Same weights and batch, three trainable sets: the norms add up as squares."""
  _, _, straight, *_ = frozen_run
  norms = {"head": read_metrics(straight)[0]["grad_norm"]}  # stage 1 trains lm_head only
  for name, trainable in (("all", '[".*"]'), ("rest", '["(?!lm_head$).*"]')):
    config = tiny_config(toy_data, f"train.stages.stage1.trainable={trainable}")
    train(config, tmp_path / name, max_steps=1)
    norms[name] = read_metrics(tmp_path / name)[0]["grad_norm"]
  assert 0 < norms["head"] < norms["all"] and 0 < norms["rest"] < norms["all"]
  assert norms["head"] ** 2 + norms["rest"] ** 2 == pytest.approx(norms["all"] ** 2, rel=1e-4)
