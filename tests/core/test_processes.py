"""omnijax.processes: where this process sits in the job, checked before JAX starts."""

import pathlib
import subprocess
import sys

import pytest

from omnijax.config import ConfigError
from omnijax.processes import ProcessGroup

TINY_EXPERIMENT = pathlib.Path(__file__).resolve().parents[1] / "train" / "tiny_experiment.yaml"


@pytest.mark.parametrize("options,message", [
    (dict(num_processes=2, process_id=0), "need --coordinator"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator="localhost:1234"), "needs --num-processes N and --process-id I"),
    (dict(coordinator="localhost:1234", num_processes=2, process_id=2), r"must lie in \[0"),
])
def test_process_options_are_checked(monkeypatch, options, message):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ConfigError, match=message):
    ProcessGroup.resolve(**options)


def test_process_group_from_the_environment(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:8476")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert ProcessGroup.resolve() == ProcessGroup("10.0.0.2:8476", 4, 3)
  assert ProcessGroup.resolve(process_id=1).process_id == 1  # options beat the environment
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='four': expected an integer"):
    ProcessGroup.resolve()


def test_the_cli_reports_bad_process_options_in_one_line():
  result = subprocess.run(
      [sys.executable, "-m", "omnijax.cli", "--coordinator", "localhost", "--num-processes", "2",
       "--process-id", "0", "info", "--config", str(TINY_EXPERIMENT)],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "omnijax info: config error: --coordinator='localhost': expected HOST:PORT, e.g. 10.0.0.2:8476")
  assert "Traceback" not in result.stderr
