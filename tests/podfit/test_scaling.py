"""`omnijax scaling`: a sweep over chip counts and strategies, written as CSV, JSON and a plot."""

import csv
import json
import pathlib
import subprocess
import sys

import pytest

from omnijax.podfit import scaling

TINY = pathlib.Path(__file__).parents[1] / "train" / "tiny_experiment.yaml"


def test_shipped_topologies_cover_every_generation_from_8_chips_up():
  for generation in scaling.GENERATIONS:
    chips = sorted(scaling.shipped_topologies(generation))
    assert {8, 16, 32, 64, 128} <= set(chips), (generation, chips)
  assert scaling.shipped_topologies("v5p")[4].name == "v5p-8.yaml"  # v5p-N counts TensorCores
  # Multi-slice topologies are not single slices of twice the chips.
  assert scaling.shipped_topologies("v5p")[128].name == "v5p-256.yaml"


def test_points_that_cannot_split_the_global_batch_say_why():
  tree = {"data": {"global_batch_size": 12}}
  topology = scaling.shipped_topologies("v5e")[8]
  reason = scaling.point_config(tree, topology, 8, scaling.strategy_mesh("fsdp", 4, 2), 1)
  assert reason == "global batch 12 does not split into micro-batches of 8 rows (1 per batch shard)"
  config = scaling.point_config(dict(tree, data={"global_batch_size": 32}), topology, 8,
                                scaling.strategy_mesh("fsdp_tensor", 4, 2), 2)
  assert config.train.grad_accum_steps == 8 and config.mesh.tensor == 4  # 2 shards x 2 rows
  # Multislice: two slices of the given topology, data parallel between them.
  half = scaling.shipped_topologies("v5e")[8]
  config = scaling.point_config(dict(tree, data={"global_batch_size": 32}), half, 16,
                                scaling.strategy_mesh("multislice", 4, 2), 1)
  assert config.topology.name == "v5e:2x4" and config.topology.num_slices == 2
  assert config.mesh.dcn_data == 2 and config.train.grad_accum_steps == 2  # 16 shards x 1 row


@pytest.mark.libtpu
def test_sweep_writes_table_json_and_plot_and_marks_the_smallest_fit(tmp_path):
  out = tmp_path / "sweep"
  result = subprocess.run(
      [sys.executable, "-m", "omnijax.cli", "scaling", "--config", str(TINY), "--generation",
       "v5e", "--chips", "8,16", "--strategies", "fsdp,fsdp_tensor,multislice", "--tensor", "2",
       "--global-batch", "8", "--out", str(out), "model.attention=xla"],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert "scaling v5e" in result.stderr and "6/6" in result.stderr  # the progress bar
  rows = list(csv.DictReader((out / "scaling.csv").open()))
  assert [(r["chips"], r["strategy"]) for r in rows] == [
      ("8", "fsdp"), ("8", "fsdp_tensor"), ("8", "multislice"),
      ("16", "fsdp"), ("16", "fsdp_tensor"), ("16", "multislice")]
  # 8 rows cannot give each of 16 FSDP batch shards a row: those points say so, uncompiled.
  for skipped in (rows[3], rows[5]):
    assert skipped["fits"] == "False" and skipped["peak_bytes_per_chip"] == ""
    assert skipped["note"] == "global batch 8 does not split into micro-batches of 16 rows (1 per batch shard)"
  # Two slices of 4 chips: v5e has no such slice; the other strategies still run at 8 chips.
  assert rows[2]["fits"] == "False" and rows[2]["note"] == "no shipped v5e slice of 4 chips"
  compiled = [rows[0], rows[1], rows[4]]
  assert all(r["fits"] == "True" and float(r["peak_bytes_per_chip"]) > 0 for r in compiled)
  # Same global batch everywhere: one row per batch shard per micro-batch.
  assert [int(r["grad_accum_steps"]) for r in compiled] == [1, 2, 1]
  report = json.loads((out / "scaling.json").read_text())
  assert report["smallest_fit"] == {"fsdp": {"topology": "v5e-8", "chips": 8},
                                    "fsdp_tensor": {"topology": "v5e-8", "chips": 8}}
  # Twice the chips: the predicted step time halves (same global batch, analytic FLOPs).
  time = {(p["chips"], p["strategy"]): p.get("predicted_step_seconds") for p in report["points"]}
  assert time[(16, "fsdp_tensor")] == pytest.approx(time[(8, "fsdp_tensor")] / 2)
  assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "fsdp: smallest slice that fits: v5e-8 (8 chips" in result.stdout


def test_bad_sweep_arguments_fail_with_one_line_before_compiling(capsys):
  from omnijax.cli import main
  base = ["scaling", "--config", str(TINY), "--generation", "v5e", "--out", "unused"]
  assert main(base + ["--chips", "12"]) == 2
  assert ("--chips 12: no shipped v5e slice of 12 chips for strategy fsdp"
          in capsys.readouterr().err)
  assert main(base + ["--chips", "8", "--strategies", "multislice"]) == 2  # two slices of 4
  assert ("--chips 8: no shipped v5e slice of 4 chips for strategy multislice"
          in capsys.readouterr().err)
  assert main(base + ["--chips", "8", "--rows-per-chip", "0"]) == 2
  assert "--rows-per-chip 0: expected >= 1" in capsys.readouterr().err
  assert main(base + ["--chips", "8,-8"]) == 2
  assert "--chips '8,-8': expected positive integers" in capsys.readouterr().err
  assert main(base + ["--strategies", "fsdp,pipeline"]) == 2
  assert "unknown strategy 'pipeline'" in capsys.readouterr().err
  assert main(base + ["--chips", "8,x"]) == 2
  assert "--chips '8,x': expected comma-separated integers" in capsys.readouterr().err
