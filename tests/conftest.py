"""Test setup: 8 forced host devices and CPU-only JAX, set before anything imports jax."""

import importlib.util
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (installed for AOT tests) otherwise probes GCE metadata and warns at import.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Compile-only libtpu use touches no chip, so a second process holding libtpu's lock is fine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  if importlib.util.find_spec("libtpu") is not None:
    return
  # CI installs libtpu, so these run there; a machine without it says why they were skipped.
  skip = pytest.mark.skip(reason="needs libtpu (pip install -e '.[tpu]') for TPU AOT compilation")
  for item in items:
    if "libtpu" in item.keywords:
      item.add_marker(skip)
