"""Faults met by `omnijax train`: damaged data, unwritable or full disks, damaged checkpoints,
divergence. Each run is the tiny experiment for at most a few steps."""

import json
import os
import signal
import time

import pytest

from fault_helpers import (REPO, assert_refused, copy_tree, make_read_only, omnijax, snapshot,
                           train_args, undo_read_only)


def _first_shard(data, task="t2i"):
  return sorted((data / "train").glob(f"{task}-*.array_record"))[0]


def test_truncated_shard_is_refused_before_training(toy_data, tmp_path):
  data = copy_tree(toy_data, tmp_path / "data")
  shard = _first_shard(data)
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 3])
  result = omnijax(*train_args(tmp_path / "run", data))
  assert_refused(result, 1, rf"^omnijax train: {shard}: record \d+: the shard holds \d+ records,"
                            r" the manifest lists \d+")
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_manifest_listing_more_records_than_the_shard_holds(toy_data, tmp_path):
  data = copy_tree(toy_data, tmp_path / "data")
  manifest_file = data / "train" / "manifest.json"
  manifest = json.loads(manifest_file.read_text())
  listed = next(s for s in manifest["shards"] if s["task"] == "t2i")
  holds = listed["records"]
  listed["records"] = 500
  manifest_file.write_text(json.dumps(manifest))
  result = omnijax(*train_args(tmp_path / "run", data))
  assert_refused(result, 1, rf"{listed['file']}: record {holds}: the shard holds {holds} records, "
                            r"the manifest lists 500")


def test_corrupt_record_names_the_shard_and_record(toy_data, tmp_path):
  data = copy_tree(toy_data, tmp_path / "data")
  for task in ("t2i", "caption", "vqa"):  # every task of stage 1: the first batch meets one
    shard = _first_shard(data, task)
    payload = bytearray(shard.read_bytes())
    for offset in range(64, len(payload) - 256, 97):
      payload[offset] ^= 0x5A
    shard.write_bytes(bytes(payload))
  result = omnijax(*train_args(tmp_path / "run", data))
  assert_refused(result, 1, r"^omnijax train: .*/train/(t2i|caption|vqa)-00000\.array_record")


def test_workdir_that_is_a_file(toy_data, tmp_path):
  workdir = tmp_path / "run"
  workdir.write_text("my notes")
  assert_refused(omnijax(*train_args(workdir, toy_data)), 1, rf"{workdir}: ")
  assert workdir.read_text() == "my notes"


def test_read_only_workdir(toy_data, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  make_read_only(workdir)
  try:
    result = omnijax(*train_args(workdir, toy_data))
  finally:
    undo_read_only(workdir)
  assert_refused(result, 1, rf"{workdir}.*: (Permission denied|Operation not permitted|"
                            r"Read-only file system)")
  assert not list(workdir.iterdir())


def test_checkpoints_path_that_is_a_file_fails_before_training(toy_data, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a directory")
  start = time.monotonic()
  result = omnijax(*train_args(workdir, toy_data), timeout=60)
  assert_refused(result, 1, rf"cannot write checkpoints to {workdir}/checkpoints: File exists")
  assert time.monotonic() - start < 60
  assert not (workdir / "metrics.jsonl").exists()


def test_disk_full_during_a_checkpoint_save_exits_promptly_in_one_line(trained_workdir, toy_data,
                                                                      tmp_path):
  workdir = copy_tree(trained_workdir, tmp_path / "run")
  kept = snapshot(workdir / "checkpoints")
  start = time.monotonic()
  # Resumes from step 4 and fails saving step 6: the tensors are larger than 50 kB.
  result = omnijax(*train_args(workdir, toy_data, "--max-steps", "6"), timeout=120,
                   file_size_limit=50_000,
                   env={"JAX_ENABLE_COMPILATION_CACHE": "false"})  # the cache would fill up too
  assert_refused(result, 1, r"^omnijax train: saving a checkpoint failed: .*checkpoints/6\..*: "
                            r"File too large; the checkpoints already in .* were kept$")
  assert time.monotonic() - start < 90  # it ended; it did not wait on Orbax's threads
  assert {k: v for k, v in snapshot(workdir / "checkpoints").items()
          if not k.startswith("6")} == kept


def test_unreadable_checkpoints(trained_workdir, toy_data, tmp_path):
  workdir = copy_tree(trained_workdir, tmp_path / "run")
  for path in (workdir / "checkpoints").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  before = snapshot(workdir)
  assert_refused(omnijax(*train_args(workdir, toy_data)), 1,
                 r"^omnijax train: no readable checkpoint in .*checkpoints: step 4: ")
  assert snapshot(workdir) == before  # nothing set aside, rewritten or deleted


def test_truncated_latest_checkpoint_falls_back_to_the_previous(trained_workdir, toy_data,
                                                                tmp_path):
  workdir = copy_tree(trained_workdir, tmp_path / "run")
  for path in (workdir / "checkpoints" / "4").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  result = omnijax(*train_args(workdir, toy_data, "--max-steps", "4"))
  assert result.returncode == 0, result.stderr
  assert "resumed from" in result.stdout and "checkpoints/2 " in result.stdout
  assert list((workdir / "checkpoints").glob("4.unreadable.*"))  # set aside, never deleted


def test_divergence_exits_3_without_saving_the_diverged_state(toy_data, tmp_path):
  result = omnijax(*train_args(tmp_path, toy_data, "train.stages.stage1.peak_lr=1e30",
                               "train.stages.stage1.warmup_steps=0"))
  # Step 1's update makes the weights huge; step 2's loss is NaN and its checkpoint is not saved.
  assert_refused(result, 3, r"^omnijax train: training diverged at step 2 \(stage stage1\): "
                            r"loss nan.*the last good checkpoint in .* was kept")
  assert not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("fault,overrides,message", [
    ("changed model", ["model.num_layers=3"], r"model\.num_layers: 2 in the run, 3 now"),
    ("changed dtype", ["model.param_dtype=bfloat16"],
     r"model\.param_dtype: float32 in the run, bfloat16 now"),
    ("changed stage", ["train.stages.stage2.peak_lr=1.0"],
     r"train\.stages\.stage2\.peak_lr: 0\.003 in the run, 1\.0 now"),
])
def test_resuming_with_another_config_is_refused_before_anything_is_written(
    trained_workdir, toy_data, tmp_path, fault, overrides, message):
  workdir = copy_tree(trained_workdir, tmp_path / "run")
  before = snapshot(workdir)
  result = omnijax(*train_args(workdir, toy_data, *overrides))
  assert_refused(result, 2, r"^omnijax train: config error: .* holds checkpoints of a run with "
                            rf"another config \({message}\); resume with the run's config")
  assert snapshot(workdir) == before  # config.yaml still describes the checkpoints


@pytest.mark.parametrize("max_steps", ["-5", "0"])
def test_max_steps_below_one_is_refused_before_the_workdir_exists(toy_data, tmp_path, max_steps):
  result = omnijax(*train_args(tmp_path / "run", toy_data, "--max-steps", max_steps))
  assert_refused(result, 2, rf"--max-steps {max_steps}: expected the global step to stop after")
  assert not (tmp_path / "run").exists()


def test_a_misspelt_data_dir_is_an_error_not_a_new_toy_world(tmp_path):
  # The toy experiment generates its world, but only into its own data directory.
  typo = tmp_path / "data" / "toywrold"
  result = omnijax("train", "--config", REPO / "tpu_configs" / "experiments" / "toy.yaml",
                   "--workdir", tmp_path / "run", f"data.dir={typo}")
  assert_refused(result, 2, rf"data\.dir='{typo}' holds no dataset .*omnijax prepare toyworld "
                            rf"--out {typo}")
  assert not typo.exists()


def test_a_second_run_in_a_held_workdir_is_refused_and_a_dead_run_does_not_hold_it(
    trained_workdir, toy_data, tmp_path):
  workdir = copy_tree(trained_workdir, tmp_path / "run")
  first = omnijax(*train_args(workdir, toy_data, "--max-steps", "12"), wait=False)
  try:
    for line in first.stdout:  # the lock is held from before the first stage starts
      if line.startswith("stage "):
        break
    # Paused, the first run holds the lock for as long as the second takes to start (on a busy
    # machine it could otherwise finish its steps and release it first).
    os.kill(first.pid, signal.SIGSTOP)
    second = omnijax(*train_args(workdir, toy_data))
    assert_refused(second, 1, rf"{workdir} is in use by another `omnijax train` "
                              rf"\(pid {first.pid} on .*\); wait for it to finish")
  finally:
    first.kill()
    first.communicate()
  third = omnijax(*train_args(workdir, toy_data, "--max-steps", "4"))
  assert third.returncode == 0, third.stderr
  assert "resumed from" in third.stdout
