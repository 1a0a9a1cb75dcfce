"""Helpers shared by the benchmarks: timing, and the same model as a transformers Qwen2."""

from __future__ import annotations

import functools
import tempfile
import time

import numpy as np

from omnijax import processes
from omnijax.model.rope import segment_positions
from omnijax.weights import convert

processes.configure_environment()


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


def packed_batch(batch: int, seq_len: int, segments: int, vocab, seed: int = 0) -> dict:
  """A train batch of rows packed with `segments` equal samples (the last takes the remainder):
  random text tokens, the second half of each sample its response (what the objective masks),
  task 0. The fields and dtypes of omnijax.data.pipeline's batches."""
  rng = np.random.default_rng(seed)
  starts = np.arange(segments) * (seq_len // segments)
  segment_ids = np.searchsorted(starts, np.arange(seq_len), side="right").astype(np.int32)
  positions = np.arange(seq_len) - starts[segment_ids - 1]
  lengths = np.diff(np.append(starts, seq_len))[segment_ids - 1]
  row = dict(segment_ids=segment_ids, positions=positions.astype(np.int32),
             response_mask=(positions >= lengths // 2).astype(np.int32),
             task_ids=np.zeros(seq_len, np.int32))
  out = {name: np.repeat(values[None], batch, 0) for name, values in row.items()}
  out["tokens"] = rng.integers(0, vocab.text_size, (batch, seq_len)).astype(np.int32)
  return out


def torch_train_step(torch_model, config, batch: dict, *, device: str = "cpu",
                     autocast_dtype=None):
  """One AdamW (beta 0.9/0.95) step with global-norm clipping at 1.0 of the twin, as a closure,
  on exactly the inputs and targets omnijax's objective makes of `batch` (masked once, at step
  20): Dream shift, mean cross-entropy over the masked targets. `autocast_dtype` runs the
  forward and backward under torch.autocast (the parameters stay fp32)."""
  import contextlib

  import jax
  import torch

  from omnijax.diffusion import objective

  vocab = config.model.vocab.build()
  corruption = objective.corrupt(jax.tree.map(np.asarray, batch), config.train.objective, vocab,
                                 config.train.seed, np.int32(20))
  inputs, targets = np.asarray(corruption.inputs), np.asarray(batch["tokens"])
  masked = torch.from_numpy(np.array(corruption.masked)[:, 1:]).to(device)
  input_ids, mask, positions = (x.to(device) for x in torch_inputs(
      inputs, np.asarray(batch["segment_ids"])))
  if autocast_dtype is not None:
    mask = mask.to(autocast_dtype)  # SDPA wants the additive mask in the queries' dtype
  labels = torch.from_numpy(targets[:, 1:].astype(np.int64)).to(device)
  adamw = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0)
  autocast = (functools.partial(torch.autocast, device.split(":")[0], dtype=autocast_dtype)
              if autocast_dtype is not None else contextlib.nullcontext)

  def step():
    adamw.zero_grad(set_to_none=True)
    with autocast():
      logits = torch_model(input_ids=input_ids, attention_mask=mask,
                           position_ids=positions).logits
      ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                             reduction="none")
    (ce[masked].mean()).backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    adamw.step()
    if device.startswith("cuda"):
      torch.cuda.synchronize()

  return step


def torch_inputs(tokens: np.ndarray, segment_ids: np.ndarray):
  """(input_ids, 4-D additive mask, position_ids) giving omnijax's segment-masked attention."""
  import torch

  allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None] != 0)
  mask = torch.from_numpy(np.where(allowed, 0.0, -1e9).astype(np.float32)[:, None])
  positions = np.asarray(segment_positions(segment_ids))
  return (torch.from_numpy(tokens.astype(np.int64)), mask,
          torch.from_numpy(positions.astype(np.int64)))
