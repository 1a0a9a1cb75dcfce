"""Two processes x 4 CPU devices joined by `jax.distributed` over gloo: what a pod's hosts do.

Each test starts `omnijax --host-devices 4 --coordinator 127.0.0.1:PORT --num-processes 2
--process-id I train ...` once per process, as `launch/` does on TPU VMs, and every process
runs under a deadline so nothing can hang the suite.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from train_helpers import TINY_EXPERIMENT
from omnijax.train.metrics import read_metrics

DEADLINE_S = 240
# One stage of 8 steps, checkpoints every 2 (tiny_experiment.yaml).
STAGE1 = ["train.stages.stage1.steps=8"]

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """`omnijax train` started once per process, each with its own log file."""

  def __init__(self, workdir, data_dir, *overrides, processes=2, options=("--stage", "1")):
    self.workdir, port = workdir, free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    self.logs = [workdir.parent / f"{workdir.name}.process{i}.log" for i in range(processes)]
    self.procs = []
    for index, log in enumerate(self.logs):
      command = [sys.executable, "-m", "omnijax.cli", "--host-devices", str(8 // processes),
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                 "--process-id", str(index), "train", "--config", str(TINY_EXPERIMENT),
                 "--workdir", str(workdir), f"data.dir={data_dir}", *STAGE1, *overrides,
                 *options]
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    self.started = time.time()

  def wait(self, deadline_s=DEADLINE_S) -> list[int]:
    """Exit codes; a process still running at the deadline fails the test (all are killed)."""
    codes = []
    for proc in self.procs:
      try:
        codes.append(proc.wait(timeout=max(self.started + deadline_s - time.time(), 1)))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"a process hung past {deadline_s} s:\n{self.output()}")
    return codes

  def wait_for_step(self, step):
    while max((m["step"] for m in read_metrics(self.workdir)), default=0) < step:
      if any(proc.poll() is not None for proc in self.procs):
        self.kill()
        pytest.fail(f"a process exited before step {step}:\n{self.output()}")
      if time.time() > self.started + DEADLINE_S:
        self.kill()
        pytest.fail(f"no step {step} within {DEADLINE_S} s:\n{self.output()}")
      time.sleep(0.2)

  def kill(self):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  def output(self, index=None) -> str:
    logs = self.logs if index is None else [self.logs[index]]
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


def losses(workdir):
  return {m["step"]: m["loss"] for m in read_metrics(workdir)}


def data_states(workdir, step):
  return json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())


@pytest.fixture(scope="module")
def reference(toy_data, tmp_path_factory):
  """An uninterrupted two-process run: the losses every interrupted run must reproduce."""
  workdir = tmp_path_factory.mktemp("two") / "run"
  job = Job(workdir, toy_data)
  codes = job.wait()
  assert codes == [0, 0], job.output()
  return workdir, losses(workdir), time.time() - job.started


def test_two_processes_learn_and_only_process_0_writes_shared_files(reference):
  workdir, reference_losses, seconds = reference
  print(f"two-process 8-step run: {seconds:.1f} s, losses {reference_losses}")
  assert sorted(reference_losses) == list(range(1, 9))  # each step logged exactly once
  assert reference_losses[8] < 0.9 * reference_losses[1]
  assert len(list((workdir / "tensorboard").iterdir())) == 1  # one writer, not two
  assert (workdir / "config.yaml").is_file() and (workdir / "loss_curves.png").is_file()
  # Every process saved its own data-iterator position: they read different samples.
  saved = data_states(workdir, 8)["processes"]
  assert len(saved) == 2 and saved[0] != saved[1]
  assert saved[0]["batches_served"] == saved[1]["batches_served"] == 8


def test_kill_9_of_one_process_then_restart_of_both_gives_identical_losses(reference, toy_data,
                                                                          tmp_path):
  _, reference_losses, _ = reference
  workdir = tmp_path / "run"
  job = Job(workdir, toy_data)
  job.wait_for_step(5)
  job.procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  # The survivor must not wait forever in a collective: JAX's coordination service notices the
  # missing heartbeats and stops it.
  codes = job.wait()
  print(f"process 0 exited {time.time() - killed:.1f} s after the kill, codes {codes}")
  assert codes[1] == -signal.SIGKILL and codes[0] != 0
  restart = Job(workdir, toy_data)
  assert restart.wait() == [0, 0], restart.output()
  assert "resumed from" in restart.output(0)
  assert losses(workdir) == reference_losses  # bit-identical, every step exactly once


def test_sigterm_to_one_process_stops_both_at_the_same_step(toy_data, tmp_path):
  workdir = tmp_path / "run"
  job = Job(workdir, toy_data, "train.checkpoint_every=100")
  job.wait_for_step(3)
  job.procs[1].send_signal(signal.SIGTERM)
  assert job.wait() == [0, 0], job.output()
  stopped = [[line for line in job.output(i).splitlines() if line.startswith("stopped by")]
             for i in range(2)]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
  step = int(stopped[0][0].split("at step ")[1].split()[0])
  print(f"SIGTERM to process 1: both stopped at step {step}, exit codes [0, 0]")
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [step]
  assert max(losses(workdir)) == step
  assert len(data_states(workdir, step)["processes"]) == 2


def test_process_0_failing_before_a_barrier_fails_every_process(tmp_path):
  empty = tmp_path / "no-data"
  empty.mkdir()
  job = Job(tmp_path / "run", empty, "toyworld.scenes=0")
  codes = job.wait(deadline_s=120)
  print(f"both exited {time.time() - job.started:.1f} s after start, codes {codes}")
  assert codes == [2, 2], job.output()
  for index in range(2):
    output = job.output(index)
    assert "omnijax train: config error:" in output and "no manifest.json" in output
    assert "Traceback" not in output
  assert "process 0 failed:" in job.output(1)
