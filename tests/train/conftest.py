"""Shared fixtures: a small toy world on disk and the tiny three-stage experiment."""

import pathlib

import pytest

from omnijax.config import load_config
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec

TINY_EXPERIMENT = pathlib.Path(__file__).parent / "tiny_experiment.yaml"


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
  out = tmp_path_factory.mktemp("toyworld")
  prepare(out, ToyWorldSpec(n=80, seed=0, grid=8))
  return out


def tiny_config(data_dir, *overrides):
  return load_config(TINY_EXPERIMENT, [f"data.dir={data_dir}", *overrides])
