"""Fixtures of the fault-injection suite: small toy data and a trained workdir, made once per
session (tests that damage them work on copies)."""

import os
import pathlib

import pytest

from fault_helpers import omnijax, train_args
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for every `omnijax` process of the session: the tiny train step
  compiles once, not once per process."""
  settings = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  previous = {key: os.environ.get(key) for key in settings}
  os.environ.update(settings)
  yield
  for key, value in previous.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> pathlib.Path:
  """A small toy world (40 scenes, 8x8 images), prepared once; tests that damage it copy it."""
  out = tmp_path_factory.mktemp("faults") / "toyworld"
  prepare(out, ToyWorldSpec(n=40, seed=0, grid=8))
  return out


@pytest.fixture(scope="session")
def trained_workdir(toy_data, tmp_path_factory) -> pathlib.Path:
  """A workdir after 4 steps of the tiny experiment (checkpoints at steps 2 and 4, the end of
  stage 1); tests copy it before use."""
  workdir = tmp_path_factory.mktemp("faults") / "run"
  result = omnijax(*train_args(workdir, toy_data, "--max-steps", "4"), timeout=240)
  assert result.returncode == 0, result.stdout + result.stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  return workdir
