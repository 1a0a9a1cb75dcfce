"""Measured attention settings per device and shape class: the Pallas kernel's block sizes, and
which backend was fastest (what `model.attention: auto` follows).

The table is data (`tuning.json` beside this module), written by
`benchmarks/attention.py --tune` on the device it describes and merged with the other devices'
entries. A shape class is (device kind as JAX reports it, head dim, sequence length, row kind):
"packed" rows hold several segments, "dense" rows one. A lookup takes the device's entry of the
same head dim and row kind whose measured length is nearest (in log scale); with none, callers
keep their defaults. Only measurements go in: every entry names its source.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from omnijax.files import atomic_write_text

TABLE_PATH = pathlib.Path(__file__).with_name("tuning.json")
ROW_KINDS = ("packed", "dense")


@dataclasses.dataclass(frozen=True)
class TuningEntry:
  """One measured shape class. `fastest` is the backend that won there ("pallas", "cudnn", ...);
  `source` says who measured it, how (command, shape, jax version) and when."""
  device: str
  head_dim: int
  length: int
  rows: str
  block_q: int
  block_k: int
  fastest: str
  source: str

  def __post_init__(self):
    if self.rows not in ROW_KINDS:
      raise ValueError(f"tuning entry rows={self.rows!r}: expected one of {ROW_KINDS}")
    for key in ("head_dim", "length", "block_q", "block_k"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
        raise ValueError(f"tuning entry {key}={getattr(self, key)!r}: expected a positive int")

  @property
  def key(self) -> tuple[str, int, int, str]:
    return self.device, self.head_dim, self.length, self.rows


def read_table(path: str | pathlib.Path | None = None) -> list[TuningEntry]:
  """Entries of the table at `path` (default: the package's; [] when there is none); a
  malformed file fails in one line naming it."""
  path = pathlib.Path(path or TABLE_PATH)
  if not path.exists():
    return []
  try:
    records = json.loads(path.read_text())["entries"]
    return [TuningEntry(**record) for record in records]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not an attention tuning table ({e})") from None


def write_table(entries: list[TuningEntry], path: str | pathlib.Path | None = None) -> None:
  """Merges `entries` into the table at `path` (default: the package's; a new measurement
  replaces the entry of the same shape class, other entries stay) and writes it atomically."""
  path = path or TABLE_PATH
  merged = {entry.key: entry for entry in read_table(path)}
  merged.update((entry.key, entry) for entry in entries)
  records = [dataclasses.asdict(merged[key]) for key in sorted(merged)]
  atomic_write_text(path, json.dumps({"entries": records}, indent=1) + "\n")


def lookup(device: str, head_dim: int, length: int, rows: str,
           path: str | pathlib.Path | None = None) -> TuningEntry | None:
  """The measured entry for this device, head dim and row kind nearest to `length`, or None."""
  candidates = [entry for entry in _cached_table(str(path or TABLE_PATH))
                if (entry.device, entry.head_dim, entry.rows) == (device, head_dim, rows)]
  if not candidates:
    return None
  return min(candidates, key=lambda entry: (abs(math.log2(entry.length / length)), entry.length))


_TABLES: dict[str, tuple[float, list[TuningEntry]]] = {}


def _cached_table(path: str) -> list[TuningEntry]:
  """The table, re-read only when the file changed (lookups run at every trace)."""
  file = pathlib.Path(path)
  stamp = file.stat().st_mtime_ns if file.exists() else -1
  if path not in _TABLES or _TABLES[path][0] != stamp:
    _TABLES[path] = (stamp, read_table(file))
  return _TABLES[path][1]
