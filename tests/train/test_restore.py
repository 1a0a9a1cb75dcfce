"""omnijax.train.restore: a training workdir's model, restored onto any mesh."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from train_helpers import tiny_config
from omnijax.config import ConfigError, MeshConfig
from omnijax.sharding import make_mesh
from omnijax.train.loop import train
from omnijax.train.restore import WorkdirError, restore_workdir


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
  """Three steps on a (data 2, fsdp 4) mesh; the checkpoint at step 3 holds the trained params."""
  workdir = tmp_path_factory.mktemp("run")
  train(tiny_config(toy_data, "mesh.data=2", "mesh.fsdp=4"), workdir, max_steps=3)
  saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "3" / "state")
  return workdir, jax.tree.map(np.asarray, saved["params"])


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize("shape", [(1, 2, 4), (1, 8, 1)])
def test_restore_on_another_mesh_equals_the_trained_params(trained, shape):
  workdir, saved = trained
  mesh = make_mesh(MeshConfig(*shape))
  run = restore_workdir(workdir, mesh=mesh)
  assert (run.step, run.stage) == (3, "stage1")
  assert run.config.mesh == MeshConfig(2, 4, 1)  # the run's own config.yaml
  restored = _params(run.model)
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(got, want)
  q_kernel = nnx.to_pure_dict(nnx.state(run.model))["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q_kernel.sharding.mesh.shape == mesh.shape
  expected = P(None, "fsdp", "tensor") if shape[2] > 1 else P(None, "fsdp", None)
  assert q_kernel.sharding.spec == expected


def test_restore_defaults_to_the_run_mesh_and_picks_a_step(trained):
  workdir, _ = trained
  run = restore_workdir(workdir, step=2)
  assert run.step == 2
  embedding = nnx.to_pure_dict(nnx.state(run.model))["embed_tokens"]
  assert dict(embedding.sharding.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(WorkdirError, match=r"no checkpoint at step 7 .*\(it has 2, 3\)"):
    restore_workdir(workdir, step=7)


def test_open_run_generates_with_the_checkpoint_at_the_step_asked(trained, toy_data):
  from omnijax.generate.run import open_run

  workdir, saved = trained
  run, generator, split_dir = open_run(workdir, data_dir=str(toy_data), split="validation", step=2)
  assert run.step == 2 and generator.model is run.model and split_dir == toy_data / "validation"
  at_2 = jax.tree.leaves(_params(restore_workdir(workdir, step=2).model))
  for got, want in zip(jax.tree.leaves(_params(generator.model)), at_2):
    np.testing.assert_array_equal(got, want)
  assert any(not np.array_equal(a, b) for a, b in zip(at_2, jax.tree.leaves(saved)))
  assert open_run(workdir, data_dir=str(toy_data))[0].step == 3  # default: the newest


def test_restore_skips_an_unreadable_checkpoint_and_changes_nothing(trained, tmp_path):
  workdir, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  for data_file in (copy / "checkpoints" / "3" / "state").rglob("d/*"):
    data_file.write_bytes(b"")  # truncated tensors
  before = sorted(p.name for p in (copy / "checkpoints").iterdir())
  run = restore_workdir(copy)
  assert run.step == 2
  assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before  # read only


def test_workdirs_without_a_run_fail_in_one_line(tmp_path, trained):
  with pytest.raises(WorkdirError, match="cannot read the run's config"):
    restore_workdir(tmp_path)
  workdir, _ = trained
  (tmp_path / "config.yaml").write_text((workdir / "config.yaml").read_text())
  with pytest.raises(WorkdirError, match="no checkpoints directory"):
    restore_workdir(tmp_path)
  assert issubclass(WorkdirError, ConfigError)  # the CLI prints it as one line
