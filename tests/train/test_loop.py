"""`omnijax train` end to end: stages, metrics, checkpoints, exact resume, reshard, guards."""

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train_helpers import TINY_EXPERIMENT, tiny_config
from omnijax.config import ConfigError
from omnijax.train.checkpoints import Checkpoints
from omnijax.train.loop import TrainingDiverged, train
from omnijax.train.metrics import read_metrics


def losses(workdir):
  return {m["step"]: m["loss"] for m in read_metrics(workdir)}


def cli(workdir, data_dir, *extra, env=None):
  command = [sys.executable, "-m", "omnijax.cli", "train", "--config", str(TINY_EXPERIMENT),
             "--workdir", str(workdir), f"data.dir={data_dir}", *extra]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **(env or {})})


def wait_for_step(workdir, step, process, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if max(losses(workdir), default=0) >= step:
      return
    if process.poll() is not None:
      raise AssertionError(f"training exited early:\n{process.stdout.read()}")
    time.sleep(0.2)
  raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def reference_run(toy_data, tmp_path_factory):
  """An uninterrupted 12-step, three-stage run: the losses every resume must reproduce."""
  workdir = tmp_path_factory.mktemp("reference")
  result = train(tiny_config(toy_data), workdir)
  return workdir, losses(workdir), result


def test_three_stages_run_in_order_with_metrics_plots_and_checkpoints(reference_run):
  workdir, reference, result = reference_run
  assert result["step"] == 12 and sorted(reference) == list(range(1, 13))
  records = read_metrics(workdir)
  assert [r["stage"] for r in records] == ["stage1"] * 4 + ["stage2"] * 4 + ["stage3"] * 4
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "targets"):
    assert all(np.isfinite(r[key]) for r in records), key
  # Each stage's mixture shows up as per-task losses: speech tasks only from stage 2 on.
  assert "loss_t2i" in records[0] and "loss_asr" not in records[0]
  assert any("loss_asr" in r for r in records[4:8])
  assert any("loss_svqa" in r for r in records[8:])
  assert (workdir / "loss_curves.png").stat().st_size > 10_000
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  checkpoints = Checkpoints(workdir / "checkpoints", keep=3)
  assert checkpoints.steps() == [8, 10, 12]  # keep-3 of 2, 4, ..., 12
  checkpoints.close()


@pytest.mark.slow
def test_shortened_main_job_learns_the_tasks_each_stage_adds(toy_data, tmp_path):
  """The toy experiment's three stages, shortened to 30 steps each with a 128-wide model: the
  loss of every task a stage adds falls within it. (The mixed loss need not: stage 3's new
  tasks enter at a high loss while the old ones are nearly flat.)"""
  config = tiny_config(toy_data, *[f"train.stages.stage{i}.steps=30" for i in (1, 2, 3)],
                       "train.checkpoint_every=30", "model.hidden_size=128",
                       "model.mlp_size=256")
  train(config, tmp_path)
  records = read_metrics(tmp_path)
  added = {"stage1": ("t2i", "caption", "vqa"), "stage2": ("asr", "tts"),
           "stage3": ("s2i", "svqa")}
  for stage, tasks in added.items():
    stage_records = [r for r in records if r["stage"] == stage]
    assert len(stage_records) == 30
    for task in tasks:
      steps = np.array([i for i, r in enumerate(stage_records) if f"loss_{task}" in r])
      task_losses = np.array([stage_records[i][f"loss_{task}"] for i in steps])
      assert len(steps) >= 10, (stage, task, len(steps))
      # Single steps are noisy (8 rows): fit a line over the stage and compare its ends.
      slope, start = np.polyfit(steps, task_losses, 1)
      assert start + 29 * slope < 0.95 * start, (stage, task, task_losses.round(2).tolist())


def test_kill_9_then_restart_gives_identical_losses(reference_run, toy_data, tmp_path):
  _, reference, _ = reference_run
  process = cli(tmp_path, toy_data)
  wait_for_step(tmp_path, 7, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  resumed = cli(tmp_path, toy_data)
  output, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, output
  assert "resumed from" in output
  assert losses(tmp_path) == reference  # bit-identical, every step exactly once


def test_sigterm_saves_and_exits_cleanly(reference_run, toy_data, tmp_path):
  _, reference, _ = reference_run
  process = cli(tmp_path, toy_data, "--checkpoint-every", "100")
  wait_for_step(tmp_path, 3, process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  assert "stopped by SIGTERM" in output
  stopped_at = max(losses(tmp_path))
  checkpoints = Checkpoints(tmp_path / "checkpoints", keep=3)
  assert checkpoints.steps()[-1] == stopped_at
  checkpoints.close()
  train(tiny_config(toy_data), tmp_path)
  assert losses(tmp_path) == reference


def test_max_steps_then_resume_onto_another_mesh(reference_run, toy_data, tmp_path):
  _, reference, _ = reference_run
  train(tiny_config(toy_data, "mesh.data=2", "mesh.fsdp=4"), tmp_path, max_steps=6)
  assert max(losses(tmp_path)) == 6
  result = train(tiny_config(toy_data, "mesh.data=1", "mesh.fsdp=8"), tmp_path)
  assert result["step"] == 12
  for step, loss in reference.items():
    assert losses(tmp_path)[step] == pytest.approx(loss, abs=1e-5)


def test_resume_with_fewer_devices(reference_run, toy_data, tmp_path):
  _, reference, _ = reference_run
  train(tiny_config(toy_data), tmp_path, max_steps=6)
  process = cli(tmp_path, toy_data,
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in output
  for step, loss in reference.items():
    assert losses(tmp_path)[step] == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize("peak_lr,message", [
    # Huge but finite weights: the next step's loss is NaN.
    ("1e30", r"diverged at step 6 \(stage stage2\): loss nan.*was kept"),
    # Weights overflow to inf in the update itself: caught before that step could be saved.
    ("1e39", r"diverged at step 5 \(stage stage2\): loss [0-9.]+, .*parameters finite: False"),
])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(toy_data, tmp_path, peak_lr,
                                                             message):
  config = tiny_config(toy_data, f"train.stages.stage2.peak_lr={peak_lr}",
                       "train.stages.stage2.warmup_steps=0")
  with pytest.raises(TrainingDiverged, match=message):
    train(config, tmp_path)
  checkpoints = Checkpoints(tmp_path / "checkpoints", keep=3)
  assert checkpoints.steps() == [2, 4]
  checkpoints.close()


def test_truncated_latest_checkpoint_falls_back_with_a_warning(reference_run, toy_data,
                                                               tmp_path, caplog):
  _, reference, _ = reference_run
  train(tiny_config(toy_data), tmp_path, max_steps=6)
  latest = tmp_path / "checkpoints" / "6" / "state"
  for path in latest.rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with caplog.at_level(logging.WARNING):
    train(tiny_config(toy_data), tmp_path)
  assert "restored checkpoint 4 instead of newer unreadable ones" in caplog.text
  assert list((tmp_path / "checkpoints").glob("6.unreadable.*"))  # set aside, not deleted
  assert losses(tmp_path) == reference


def test_one_stage_at_a_time(reference_run, toy_data, tmp_path):
  _, reference, _ = reference_run
  train(tiny_config(toy_data), tmp_path, max_steps=2)
  with pytest.raises(ConfigError, match="--stage stage3 starts at step 8 .* run the earlier"):
    train(tiny_config(toy_data), tmp_path, only_stage="stage3")
  train(tiny_config(toy_data), tmp_path, only_stage="stage1")
  assert max(losses(tmp_path)) == 4
  train(tiny_config(toy_data), tmp_path, only_stage="2")  # by number, as `--stage 2`
  assert max(losses(tmp_path)) == 8
  with pytest.raises(ConfigError, match=r"--stage 4: expected one of \['stage1', 'stage2', "
                                        r"'stage3'\] or a number 1..3"):
    train(tiny_config(toy_data), tmp_path, only_stage="4")
  assert {s: losses(tmp_path)[s] for s in range(1, 9)} == {s: reference[s] for s in range(1, 9)}


def test_resume_refuses_a_changed_config_before_writing_anything(toy_data, tmp_path):
  train(tiny_config(toy_data), tmp_path, max_steps=2)
  files = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*")
                   if p.is_file() and p.name != "lock"}
  before = files()
  for overrides, message in ((["model.num_layers=3"], r"model\.num_layers: 2 in the run, 3 now"),
                             (["model.param_dtype=bfloat16"],
                              r"model\.param_dtype: float32 in the run, bfloat16 now"),
                             (["data.seed=1"], r"data\.seed: 0 in the run, 1 now")):
    with pytest.raises(ConfigError, match=message + r".*resume with the run's config"):
      train(tiny_config(toy_data, *overrides), tmp_path)
  assert files() == before  # config.yaml still describes the checkpoints
  # How the run is computed may change: another mesh, logging, saving.
  train(tiny_config(toy_data, "mesh.data=2", "mesh.fsdp=4", "train.log_every=2"), tmp_path,
        max_steps=2)


def test_checkpoints_without_a_run_config_are_still_guarded(toy_data, tmp_path):
  train(tiny_config(toy_data), tmp_path, max_steps=2)
  (tmp_path / "config.yaml").unlink()  # e.g. a workdir from before config.yaml was compared
  with pytest.raises(ConfigError, match=r"data.seed differs from the checkpoint at step 2"):
    train(tiny_config(toy_data, "data.seed=1"), tmp_path)
  config = tiny_config(toy_data)
  stages = {"warmup" if name == "stage1" else name: stage
            for name, stage in config.train.stages.items()}
  config = dataclasses.replace(config, train=dataclasses.replace(config.train, stages=stages))
  with pytest.raises(ConfigError, match="written by stage 'stage1', which train.stages no longer"):
    train(config, tmp_path)
  # Nothing was set aside: a config mistake is not a corrupt checkpoint.
  assert not list((tmp_path / "checkpoints").glob("*.unreadable.*"))


def test_a_stage_mixture_without_data_fails_before_training(toy_data, tmp_path):
  only_images = tmp_path / "data"
  from omnijax.data.toyworld.prepare import prepare
  from omnijax.data.toyworld.world import ToyWorldSpec
  prepare(only_images, ToyWorldSpec(n=10, seed=0, grid=8))
  for shard in (only_images / "train").glob("svqa*"):
    shard.unlink()
  manifest = json.loads((only_images / "train" / "manifest.json").read_text())
  del manifest["tasks"]["svqa"]
  manifest["shards"] = [shard for shard in manifest["shards"] if shard["task"] != "svqa"]
  (only_images / "train" / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ConfigError, match=r"train.stages.stage3.mixture.*holds no svqa records"):
    train(tiny_config(only_images), tmp_path / "run")
  # Refused before any step: no metrics and no checkpoint were written.
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_starts_from_init_from_weights(toy_data, tmp_path):
  from omnijax.model.build import create_model
  from omnijax.model.params_io import save_model
  config = tiny_config(toy_data)
  save_model(create_model(config.model, seed=5), config.model, tmp_path / "weights")
  train(tiny_config(toy_data, "train.seed=5"), tmp_path / "seeded", max_steps=1)
  train(tiny_config(toy_data, f"train.init_from={tmp_path / 'weights'}", "train.seed=5"),
        tmp_path / "loaded", max_steps=1)
  # The same weights, not merely similar ones (other weights change the loss in its first
  # digits); the two runs compile and place their parameters separately, which moves fp32 sums
  # in the 7th digit.
  assert losses(tmp_path / "loaded") == pytest.approx(losses(tmp_path / "seeded"), rel=1e-6)
  with pytest.raises(ConfigError, match="train.init_from=.*do not match model"):
    train(tiny_config(toy_data, f"train.init_from={tmp_path / 'weights'}",
                      "model.mlp_size=64"), tmp_path / "mismatch", max_steps=1)


def test_the_autoregressive_objective_trains_the_three_stages_through_the_cli(toy_data, tmp_path):
  from omnijax.data.pipeline import Batches
  from omnijax.train.loop import stage_data_config

  shortened = [f"train.stages.stage{i}.steps=2" for i in (1, 2, 3)]
  process = cli(tmp_path, toy_data, "train.objective.kind=ar", *shortened)
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output
  records = read_metrics(tmp_path)
  assert [r["stage"] for r in records] == ["stage1"] * 2 + ["stage2"] * 2 + ["stage3"] * 2
  assert all(np.isfinite(r["loss"]) for r in records)
  # Every response token is a target (a masked-diffusion objective draws about half of them):
  # the count of the first batch's response tokens, each after a token of its own sample.
  config = tiny_config(toy_data, "train.objective.kind=ar")
  with contextlib.closing(Batches(stage_data_config(config, config.train.stages["stage1"]),
                                  config.model.vocab.build())) as data:
    batch = next(data)
  segments = batch["segment_ids"]
  response = (batch["response_mask"] > 0) & (segments > 0)
  response[:, 1:] &= segments[:, 1:] == segments[:, :-1]
  assert records[0]["targets"] == int(response[:, 1:].sum()) > 0
