"""Faults met by `omnijax eval`: an output that is a directory, in use or would overwrite itself,
damaged held-out shards, an edited workdir config. Each is refused in one line naming the path,
and an earlier eval.json stays as it was."""

import os

import pytest

from fault_helpers import assert_refused, copy_tree, omnijax, snapshot
from omnijax.files import output_lock


def evaluate(workdir, out, *args):
  return omnijax("eval", "--checkpoint", workdir, "--tasks", "caption", "--steps", 2, "--limit", 2,
                 "--out", out, *args)


@pytest.fixture(scope="module")
def earlier(trained_workdir, toy_data, tmp_path_factory):
  """An eval.json (and its pictures) from an evaluation that succeeded."""
  out = tmp_path_factory.mktemp("eval") / "eval.json"
  done = evaluate(trained_workdir, out, "--data", toy_data)
  assert done.returncode == 0, done.stderr
  return out


def test_an_output_that_is_a_directory_or_its_own_picture(trained_workdir, tmp_path):
  directory = tmp_path / "results"
  (directory / "kept.txt").parent.mkdir()
  (directory / "kept.txt").write_text("keep me")
  # Used to report the temporary file's name, after the whole evaluation.
  assert_refused(evaluate(trained_workdir, directory), 2,
                 rf"^omnijax eval: --out {directory} is a directory; name the JSON file to write, "
                 rf"e\.g\. {directory}/eval\.json")
  assert_refused(evaluate(trained_workdir, tmp_path / "eval.png"), 2,
                 rf"--out {tmp_path}/eval\.png: the pictures beside it are eval\.png and "
                 r"eval_samples\.png; give the JSON a \.json name")
  (tmp_path / "e.png").mkdir()
  assert_refused(evaluate(trained_workdir, tmp_path / "e.json"), 2,
                 rf"--out {tmp_path}/e\.json: its picture {tmp_path}/e\.png is a directory")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e.png", "results"]
  assert (directory / "kept.txt").read_text() == "keep me"


def test_a_second_eval_writing_the_same_json_is_refused(trained_workdir, toy_data, earlier):
  # Two evals on one --out used to lose one result without a word.
  before = snapshot(earlier.parent)
  with output_lock(earlier, "eval"):
    result = evaluate(trained_workdir, earlier, "--data", toy_data)
  assert_refused(result, 1, rf"^omnijax eval: {earlier} is being written by another `omnijax "
                            rf"eval` \(pid {os.getpid()} on .*\); wait for it to finish")
  assert snapshot(earlier.parent) == before


@pytest.mark.parametrize("fault,damage,message", [
    ("a shard linked to /dev/zero", lambda p: (p.unlink(), p.symlink_to("/dev/zero")),
     r"record 0: not a regular file \(a character device\), not the shard the manifest lists"),
    ("a FIFO for a shard", lambda p: (p.unlink(), os.mkfifo(p)),
     r"record 0: not a regular file \(a FIFO\)"),
    ("a truncated shard", lambda p: p.write_bytes(p.read_bytes()[:100]),
     r"record 0: the shard holds 0 records, the manifest lists \d+"),
])
def test_damaged_heldout_shards_are_named(trained_workdir, toy_data, earlier, tmp_path, fault,
                                          damage, message):
  data = copy_tree(toy_data, tmp_path / "data")
  shard = sorted((data / "heldout").glob("caption-*.array_record"))[0]
  damage(shard)
  before = snapshot(earlier.parent)
  assert_refused(evaluate(trained_workdir, earlier, "--data", data), 2,
                 rf"^omnijax eval: {shard}: " + message)
  assert snapshot(earlier.parent) == before, fault


def test_an_edited_workdir_config_is_named(trained_workdir, earlier, tmp_path):
  workdir = copy_tree(trained_workdir, tmp_path / "run")
  config = workdir / "config.yaml"
  config.write_text(config.read_text().replace("hidden_size: 64", "hidden_size: 32"))
  before = snapshot(workdir), snapshot(earlier.parent)
  assert_refused(evaluate(workdir, earlier), 2,
                 rf"^omnijax eval: config error: {config} does not describe the run's checkpoints")
  assert (snapshot(workdir), snapshot(earlier.parent)) == before
