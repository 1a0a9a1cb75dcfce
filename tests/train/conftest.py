"""Shared fixture: a small toy world on disk (80 scenes, 8x8 images)."""

import pytest

from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
  out = tmp_path_factory.mktemp("toyworld")
  prepare(out, ToyWorldSpec(n=80, seed=0, grid=8))
  return out
