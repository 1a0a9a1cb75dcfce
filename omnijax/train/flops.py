"""Analytic training FLOPs per token and the peak FLOP/s MFU is measured against.

XLA's cost analysis counts a scanned layer once and includes remat recomputation, so MFU
uses the analytic count (as MaxText does): 6 x matmul parameters (the embedding gather is free,
the lm_head is a matmul) plus attention 12 x layers x seq_len x heads x head_dim — the full
bidirectional score matrix, NOT halved as for causal models.

With continuous speech input, each row also runs its clips (data.speech_clips of
data.speech_frames frames: the fixed shape the step computes, whatever the clips' lengths)
through the speech encoder and projector, counted the same way over their T + 4 frames:
2 x matmul parameters forward plus 4 x frames x width per block for the scores, x3 for a
trained module (its backward), forward only for the frozen encoder (stop_gradient: no backward
runs through it). These FLOPs are per row; per token they are spread over seq_len.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp

from omnijax.config import SPEECH_QUERIES, Config, ModelConfig, SpeechEncoderConfig, StageConfig

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


def training_flops_per_token(config: ModelConfig, seq_len: int,
                             speech_flops_per_row: float = 0.0) -> float:
  """The backbone's training FLOPs per token, plus a row's speech FLOPs spread over its tokens."""
  attention = 12 * config.num_layers * seq_len * config.num_heads * config.resolved_head_dim
  return 6 * matmul_params(config) + attention + speech_flops_per_row / seq_len


def speech_encoder_matmul_params(encoder: SpeechEncoderConfig) -> int:
  """The encoder's matmul weights: per block q, k, v from its input width, out, and the FFN."""
  d, f = encoder.hidden_size, encoder.mlp_size
  block = lambda in_size: 3 * in_size * d + d * d + 2 * d * f
  return block(encoder.feature_size) + (encoder.num_blocks - 1 + encoder.tp_blocks) * block(d)


def speech_flops_per_clip(model: ModelConfig, frames: int, train_encoder: bool,
                          train_projector: bool) -> float:
  """Training FLOPs of one clip of `frames` input frames through the encoder and projector."""
  encoder = model.speech_encoder
  length = frames + SPEECH_QUERIES
  blocks = encoder.num_blocks + encoder.tp_blocks
  encoder_forward = (2 * speech_encoder_matmul_params(encoder) * length
                     + 4 * blocks * length * length * encoder.hidden_size)
  projector_forward = 2 * (encoder.hidden_size + model.hidden_size) * model.hidden_size * length
  return (encoder_forward * (3 if train_encoder else 1)
          + projector_forward * (3 if train_projector else 1))


def speech_flops_per_row(config: Config, stage: StageConfig) -> float:
  """Speech FLOPs of one row of `config`'s batches in `stage` (0 without a speech encoder)."""
  if config.model.speech_encoder is None:
    return 0.0
  # Whether a module trains, by one of its parameters' paths (the optimizer's labels are per
  # parameter; a stage trains or freezes each module whole).
  trains = lambda name: any(re.fullmatch(pattern, name) for pattern in stage.trainable)
  train_encoder = not stage.freeze_speech_encoder and trains("speech_encoder/queries")
  per_clip = speech_flops_per_clip(config.model, config.data.speech_frames, train_encoder,
                                   trains("speech_projector/linear_in/kernel"))
  return config.data.speech_clips * per_clip


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
