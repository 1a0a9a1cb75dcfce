"""Test setup: CPU-only JAX (read when jax is imported) with 8 forced host devices, and the
rest of omnijax's process environment, before any test touches a backend."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from omnijax import processes  # noqa: E402

processes.configure_environment(host_devices=8)


def pytest_collection_modifyitems(config, items):
  if importlib.util.find_spec("libtpu") is not None:
    return
  # CI installs libtpu, so these run there; a machine without it says why they were skipped.
  skip = pytest.mark.skip(reason="needs libtpu (pip install -e '.[tpu]') for TPU AOT compilation")
  for item in items:
    if "libtpu" in item.keywords:
      item.add_marker(skip)
