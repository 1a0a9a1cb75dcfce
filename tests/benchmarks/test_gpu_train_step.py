"""`benchmarks/gpu_train_step.py` end to end on CPU at the tiny preset: every backend and the
PyTorch twin report a rate, and the ratios and MFUs printed are those rates' (no timings are
asserted)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
ROW = re.compile(r"^ *(\S+) train step: +([\d.]+) ms +([\d.]+) tokens/s  MFU (n/a|[\d.]+) % of "
                 r"spec, ([\d.]+) % of measured  ratio ([\d.]+)x pytorch$", re.M)


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_train_step.py"), *args],
                        capture_output=True, text=True, timeout=300, env=env)


def test_tiny_preset_beside_the_twin_with_consistent_ratios_and_mfu(tmp_path):
  result = _run("--preset", "tiny", "--batch", "2", "--seq-len", "128", "--segments", "4",
                "--steps", "1", "--attention", "xla,auto", "--profile", str(tmp_path / "prof"),
                "model.num_layers=1")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "spec peak: unknown for 'cpu'" in out  # MFU of spec is n/a, not invented
  measured = float(re.search(r"measured matmul rate: ([\d.e+-]+) TFLOP/s", out).group(1)) * 1e12
  per_token = float(re.search(r"analytic training FLOPs: ([\d.e+-]+) GFLOP/token", out).group(1))
  assert "1 layers), batch 2 x 128 tokens in rows of 4 segments" in out
  rows = {name: tuple(values) for name, *values in ROW.findall(out)}
  assert set(rows) == {"pytorch", "omnijax-xla", "omnijax-auto"}
  twin_rate = float(rows["pytorch"][1])
  for name, (ms, rate, spec_mfu, measured_mfu, ratio) in rows.items():
    rate = float(rate)
    # ms is printed to 0.01 ms (at a few ms ~0.1 % of the step) and the rate to 0.1 token/s
    assert 2 * 128e3 / (float(ms) + 0.005) - 0.05 <= rate <= 2 * 128e3 / (float(ms) - 0.005) + 0.05
    assert float(ratio) == pytest.approx(rate / twin_rate, rel=2e-3, abs=1e-3)
    assert spec_mfu == "n/a"
    assert float(measured_mfu) == pytest.approx(100 * rate * per_token * 1e9 / measured,
                                                 rel=1e-3, abs=0.051)  # printed to 0.1 %
  assert "model.attention=auto: xla for packed rows on cpu (cpu)" in result.stderr
  for backend in ("xla", "auto"):
    assert list((tmp_path / "prof" / backend).rglob("*.xplane.pb"))


def test_a_backend_that_cannot_run_is_reported_in_one_line_and_the_others_still_run():
  result = _run("--preset", "tiny", "--batch", "1", "--seq-len", "64", "--steps", "1",
                "--no-twin", "--attention", "cudnn,xla", "model.num_layers=1")
  assert result.returncode == 1
  assert re.search(r"omnijax-xla train step: +[\d.]+ ms", result.stdout)
  assert ("omnijax-cudnn train step: failed (ValueError: attention='cudnn' needs a GPU, but the "
          "platform is 'cpu'" in result.stdout)
  assert "ratio" not in result.stdout and "Traceback" not in result.stderr


def test_bad_arguments_fail_in_one_line():
  result = _run("--preset", "2b")
  assert result.returncode == 2 and "--preset '2b' is not one of" in result.stderr
  assert "Traceback" not in result.stderr
  result = _run("--preset", "tiny", "--attention", "flash")
  assert result.returncode == 2 and "--attention 'flash' is not one of" in result.stderr
