"""Workdir paths: local paths become absolute, gs:// URLs stay URLs, and every file the
training writes into a workdir goes through etils.epath (here a mocked bucket on disk)."""

import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from omnijax import files
from omnijax.train import metrics


@pytest.fixture
def bucket(tmp_path):
  """gs://bucket/... served from tmp_path/bucket/... through epath's own backend hooks."""
  def local(path):
    path = os.fspath(path)
    assert path.startswith("gs://bucket/"), path  # nothing else may be touched as remote
    return str(tmp_path / path[len("gs://"):])

  def redirect(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_(original, path, mode, *args, **kwargs):
    if "w" in mode:  # object stores have no directories to create first
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return original(local(path), mode, *args, **kwargs)

  def rename(original, path, dest, *args, **kwargs):
    return original(local(path), local(dest), *args, **kwargs)

  with epath_testing.mock_epath(open=open_, exists=redirect, isdir=redirect,
                                makedirs=redirect, mkdir=redirect, listdir=redirect,
                                remove=redirect, rename=rename, replace=rename):
    yield tmp_path / "bucket"


def test_remote_urls_are_never_resolved_against_the_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(files.resolve("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
  assert files.is_remote("gs://bucket/run") and not files.is_remote("runs/toy")
  assert str(files.resolve("runs/toy")) == str(tmp_path / "runs" / "toy")


def test_atomic_writes_reach_the_bucket_whole(bucket, tmp_path):
  files.atomic_write_text("gs://bucket/run/config.yaml", "model: {}\n")
  assert (bucket / "run" / "config.yaml").read_text() == "model: {}\n"
  files.atomic_write_text("gs://bucket/run/config.yaml", "model: {num_layers: 2}\n")
  assert (bucket / "run" / "config.yaml").read_text() == "model: {num_layers: 2}\n"
  assert sorted(p.name for p in (bucket / "run").iterdir()) == ["config.yaml"]
  local = tmp_path / "local.txt"
  files.atomic_write_text(local, "x")
  assert local.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == [
      "bucket", "local.txt"]


def test_metrics_and_plots_in_a_gs_workdir(bucket, monkeypatch):
  logdirs = []

  class Events:  # tensorboardX writes gs:// itself (with google-cloud-storage installed)
    def __init__(self, logdir):
      logdirs.append(logdir)

    def add_scalar(self, *args):
      pass

    def close(self):
      pass

  monkeypatch.setattr(metrics, "SummaryWriter", Events)
  record = lambda step, loss: {"step": step, "stage": "stage1", "loss": loss}  # noqa: E731
  logger = metrics.MetricsLogger("gs://bucket/run", 0, 3)
  logger.log(record(1, 3.0))
  logger.log(record(2, 2.5))
  logger.close()
  assert logdirs == ["gs://bucket/run/tensorboard"]
  assert [m["step"] for m in metrics.read_metrics("gs://bucket/run")] == [1, 2]
  # A resume from step 1 drops the step-2 entry written before the crash.
  logger = metrics.MetricsLogger("gs://bucket/run", 1, 3)
  logger.log(record(2, 2.4))
  logger.close()
  assert [m["loss"] for m in metrics.read_metrics("gs://bucket/run")] == [3.0, 2.4]
  path = metrics.plot_loss_curves("gs://bucket/run")
  assert str(path) == "gs://bucket/run/loss_curves.png"
  assert (bucket / "run" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_config_is_read_from_a_gs_workdir(bucket):
  from omnijax.config import CONFIG_ROOT, load_config, to_dict
  from omnijax.train.restore import WorkdirError, read_run_config
  import yaml

  config = load_config(CONFIG_ROOT / "experiments" / "toy.yaml")
  files.atomic_write_text("gs://bucket/run/config.yaml", yaml.safe_dump(to_dict(config)))
  assert read_run_config("gs://bucket/run") == config
  with pytest.raises(WorkdirError, match="gs://bucket/other/config.yaml: cannot read"):
    read_run_config("gs://bucket/other")
  assert isinstance(files.resolve("gs://bucket/run"), epath.Path)


def test_atomic_writes_get_the_mode_of_a_plain_write_or_of_the_file_they_replace(tmp_path):
  mask = os.umask(0o022)
  try:
    files.atomic_write_text(tmp_path / "new.json", "{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    kept.chmod(0o640)
    files.atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640
  finally:
    os.umask(mask)


def test_an_output_lock_refuses_a_second_writer_and_leaves_no_file(tmp_path):
  import subprocess
  import sys

  target = tmp_path / "eval.json"
  with files.output_lock(target, "eval"):
    with pytest.raises(files.OutputBusyError, match=rf"{target} is being written by another "
                                                    rf"`omnijax eval` \(pid {os.getpid()} on "):
      with files.output_lock(target, "eval"):
        pass
  assert not list(tmp_path.iterdir())
  # A holder killed with -9 leaves an unlocked file behind: the next writer takes it.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR "
       "| os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
       str(tmp_path / ".eval.json.lock")], stdout=subprocess.PIPE, text=True)
  try:
    holder.stdout.readline()
    with pytest.raises(files.OutputBusyError):
      with files.output_lock(target, "eval"):
        pass
  finally:
    holder.kill()
    holder.communicate()
  with files.output_lock(target, "eval"):
    assert (tmp_path / ".eval.json.lock").read_text().startswith(f"pid {os.getpid()} on ")
  assert not list(tmp_path.iterdir())


def test_files_that_are_not_regular_are_named(tmp_path):
  files.check_regular_file(tmp_path / "missing")  # the caller's open says it is missing
  (tmp_path / "plain").write_text("x")
  files.check_regular_file(tmp_path / "plain")
  os.mkfifo(tmp_path / "fifo")
  (tmp_path / "zero").symlink_to("/dev/zero")
  for path, kind in ((tmp_path / "fifo", "a FIFO"), (tmp_path / "zero", "a character device"),
                     (tmp_path, "a directory")):
    with pytest.raises(files.NotRegularFileError) as raised:
      files.check_regular_file(path)
    assert str(raised.value) == f"{path}: not a regular file ({kind})"
  # Writing over a directory names the directory, not the temporary file beside it.
  with pytest.raises(IsADirectoryError) as raised:
    files.atomic_write_text(tmp_path, "x")
  assert raised.value.filename == str(tmp_path)
