"""The few cross-process agreements training needs on a multi-host pod (no-ops on one host)."""

from __future__ import annotations

import json

import jax
import numpy as np


def is_primary() -> bool:
  """Process 0 writes shared files (metrics, configs, generated data)."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process when it is True on any (e.g. one host got SIGTERM)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def gather_json(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  encoded = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(encoded)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:len(encoded)] = encoded
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:length])) for row, length in zip(rows, lengths)]


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
