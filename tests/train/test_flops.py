"""The peak-FLOPs table MFU is measured against, and the measured matmul rate fallback."""

import jax
import pytest

from omnijax.train import flops


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("TPU v5", 459e12),
])
def test_spec_peak_by_the_device_kind_jax_reports(kind, peak, monkeypatch):
  monkeypatch.setattr(jax, "devices", lambda *a: [type("Device", (), {"device_kind": kind})()])
  assert flops.peak_flops_per_device() == (peak, f"spec sheet ({kind})")


def test_an_unknown_device_falls_back_to_the_measured_matmul_rate():
  peak, source = flops.peak_flops_per_device()
  assert peak > 0 and source == "measured fp32 matmul rate (cpu)"
  assert flops.peak_flops_per_device(123.0) == (123.0, "train.peak_flops_per_device")
