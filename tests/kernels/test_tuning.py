"""The tuning table: atomic merge of measurements, nearest-length lookup, and the Pallas kernel
taking its blocks from it (with today's default where it has no entry)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from omnijax.kernels import flash_attention, flash_gpu, tuning
from omnijax.kernels.tuning import TuningEntry


def _entry(device="dev A", length=4096, rows="packed", block=64, fastest="pallas"):
  return TuningEntry(device, 128, length, rows, block, block, fastest, "test")


def test_write_merges_with_other_devices_and_replaces_the_same_shape_class(tmp_path):
  table = tmp_path / "tuning.json"
  tuning.write_table([_entry("dev A", block=64), _entry("dev B", block=32)], table)
  tuning.write_table([_entry("dev A", block=128), _entry("dev A", rows="dense", block=16)], table)
  entries = {(e.device, e.rows): e.block_q for e in tuning.read_table(table)}
  assert entries == {("dev A", "packed"): 128, ("dev A", "dense"): 16, ("dev B", "packed"): 32}
  assert not [p.name for p in tmp_path.iterdir() if p.name != "tuning.json"]  # no temp files left


def test_lookup_takes_the_nearest_measured_length_of_the_same_class(tmp_path):
  table = tmp_path / "tuning.json"
  tuning.write_table([_entry(length=4096, block=64), _entry(length=16384, block=128),
                      _entry(rows="dense", length=4096, block=32)], table)
  assert tuning.lookup("dev A", 128, 2048, "packed", table).block_q == 64
  assert tuning.lookup("dev A", 128, 12000, "packed", table).block_q == 128
  assert tuning.lookup("dev A", 128, 65536, "dense", table).block_q == 32
  assert tuning.lookup("dev A", 64, 4096, "packed", table) is None  # other head dim
  assert tuning.lookup("dev C", 128, 4096, "packed", table) is None  # other device
  # Rewriting the file is seen by the next lookup (the cache follows the file).
  tuning.write_table([_entry(length=4096, block=16)], table)
  assert tuning.lookup("dev A", 128, 4096, "packed", table).block_q == 16


def test_a_malformed_table_fails_in_one_line_naming_the_file(tmp_path):
  table = tmp_path / "tuning.json"
  table.write_text(json.dumps({"entries": [{"device": "x"}]}))
  with pytest.raises(ValueError, match=f"{table}: not an attention tuning table"):
    tuning.read_table(table)
  table.write_text(json.dumps({"entries": [dict(vars(_entry()), rows="causal")]}))
  with pytest.raises(ValueError, match="rows='causal'"):
    tuning.read_table(table)


def test_shipped_table_holds_only_sourced_measurements():
  entries = tuning.read_table()
  assert entries and all(e.source.startswith("issue 12") or "--tune" in e.source
                         for e in entries)


def _kernel_grids(length, rows, **kwargs):
  """The grids of the forward kernel's pallas_call, as traced for a cpu device."""
  q = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda q, ids: flash_attention(q, q, q, ids, platform="gpu",
                                                        interpret=True, rows=rows, **kwargs))(
      q, ids)
  return list(_pallas_grids(jaxpr.jaxpr))


def _pallas_grids(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn.params["grid_mapping"].grid
    for param in eqn.params.values():  # custom_vjp and pjit hold the call in a sub-jaxpr
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _pallas_grids(inner)


def test_the_gpu_kernel_takes_its_blocks_from_the_table(tmp_path, monkeypatch):
  table = tmp_path / "tuning.json"
  tuning.write_table([TuningEntry("cpu", 32, 256, "packed", 32, 16, "pallas", "test")], table)
  monkeypatch.setattr(tuning, "TABLE_PATH", table)
  # Grid (batch, heads, L / block_q): 256 / 32 with the table's block, 256 / 64 by default.
  assert _kernel_grids(256, "packed") == [(1, 2, 8)]
  assert _kernel_grids(256, "dense") == [(1, 2, 256 // flash_gpu.DEFAULT_BLOCK)]
  assert _kernel_grids(256, "packed", block_q=128) == [(1, 2, 2)]  # an explicit block wins


def test_tune_mode_writes_measured_blocks_for_this_device(tmp_path):
  """`benchmarks/attention.py --tune` on CPU: interpret-mode kernel at tiny shapes."""
  table = tmp_path / "tuning.json"
  tuning.write_table([_entry("NVIDIA H200", block=128)], table)
  result = subprocess.run(
      [sys.executable, "benchmarks/attention.py", "--tune", "--small", "--interpret",
       "--repeats", "1", "--table", str(table)],
      capture_output=True, text=True, timeout=240, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  entries = {(e.device, e.length, e.rows): e for e in tuning.read_table(table)}
  assert entries[("NVIDIA H200", 4096, "packed")].block_q == 128  # another device's entry kept
  for rows in tuning.ROW_KINDS:
    entry = entries[("cpu", 256, rows)]
    assert (entry.block_q, entry.block_k) in {(16, 16), (32, 32)}
    assert entry.fastest in ("pallas", "xla") and "--tune" in entry.source
    assert f"{rows} rows: blocks {entry.block_q}x{entry.block_k}" in result.stdout
