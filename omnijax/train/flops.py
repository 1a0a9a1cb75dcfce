"""Analytic training FLOPs per token and the peak FLOP/s MFU is measured against.

XLA's cost analysis counts a scanned layer once and includes remat recomputation, so MFU
uses the analytic count (as MaxText does): 6 x matmul parameters (the embedding gather is free,
the lm_head is a matmul) plus attention 12 x layers x seq_len x heads x head_dim — the full
bidirectional score matrix, NOT halved as for causal models.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from omnijax.config import ModelConfig

# bf16 dense (no sparsity) peak per device (vendors' spec sheets), keyed by `device.device_kind`
# as JAX reports it: TPUs by generation ("TPU v5 lite" is v5e, "TPU v5" is v5p), NVIDIA GPUs by
# the CUDA device name, which tells the H100 variants apart (SXM "80GB HBM3", PCIe, NVL).
# Unknown kinds fall back to a measurement.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
}


def matmul_params(config: ModelConfig) -> int:
  d, hd = config.hidden_size, config.resolved_head_dim
  q, kv = config.num_heads * hd, config.num_kv_heads * hd
  per_layer = d * q + 2 * d * kv + q * d + 3 * d * config.mlp_size
  return config.num_layers * per_layer + d * config.vocab_size  # + lm_head


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  attention = 12 * config.num_layers * seq_len * config.num_heads * config.resolved_head_dim
  return 6 * matmul_params(config) + attention


def measured_matmul_flops(size: int = 1024, repeats: int = 10, dtype=jnp.float32) -> float:
  """FLOP/s of a [size x size] matmul in `dtype` on the default device (the CPU 'peak' in fp32;
  on an accelerator, a bf16 size >= 8192 matmul is the practical peak)."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(a).block_until_ready()
  return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, where the number came from)."""
  if configured > 0:
    return configured, "train.peak_flops_per_device"
  kind = jax.devices()[0].device_kind
  if kind in PEAK_FLOPS_BY_DEVICE_KIND:
    return PEAK_FLOPS_BY_DEVICE_KIND[kind], f"spec sheet ({kind})"
  return measured_matmul_flops(), f"measured fp32 matmul rate ({kind})"
