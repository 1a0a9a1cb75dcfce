"""Fixtures of the fault-injection suite: small toy data and a trained workdir, made once per
session (tests that damage them work on copies)."""

import pathlib

import pytest

from fault_helpers import omnijax, train_args
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> pathlib.Path:
  """A small toy world (40 scenes, 8x8 images), prepared once; tests that damage it copy it."""
  out = tmp_path_factory.mktemp("faults") / "toyworld"
  prepare(out, ToyWorldSpec(n=40, seed=0, grid=8))
  return out


@pytest.fixture(scope="session")
def trained_workdir(toy_data, tmp_path_factory) -> pathlib.Path:
  """A workdir after 2 steps of the tiny experiment (checkpoint at step 2); copy before use."""
  workdir = tmp_path_factory.mktemp("faults") / "run"
  result = omnijax(*train_args(workdir, toy_data, "--max-steps", "2"), timeout=240)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (workdir / "checkpoints" / "2").is_dir()
  return workdir
