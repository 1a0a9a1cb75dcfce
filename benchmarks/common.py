"""Helpers shared by the benchmarks: timing, and the same model as a transformers Qwen2."""

from __future__ import annotations

import tempfile
import time

import numpy as np

from omnijax import convert, runtime
from omnijax.model.rope import segment_positions

runtime.configure_environment()


def time_per_call(fn, steps: int) -> float:
  """Mean seconds per call after one warm-up call (compilation, allocator)."""
  fn()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def torch_twin(model, config):
  """The same weights as a transformers Qwen2ForCausalLM (via omnijax's HF export)."""
  import transformers

  with tempfile.TemporaryDirectory() as tmp:
    convert.to_hf(model, config, tmp)
    return transformers.Qwen2ForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")


def torch_inputs(tokens: np.ndarray, segment_ids: np.ndarray):
  """(input_ids, 4-D additive mask, position_ids) giving omnijax's segment-masked attention."""
  import torch

  allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None] != 0)
  mask = torch.from_numpy(np.where(allowed, 0.0, -1e9).astype(np.float32)[:, None])
  positions = np.asarray(segment_positions(segment_ids))
  return (torch.from_numpy(tokens.astype(np.int64)), mask,
          torch.from_numpy(positions.astype(np.int64)))
