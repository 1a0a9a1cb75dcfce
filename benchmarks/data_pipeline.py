"""Host input-pipeline throughput vs what one TPU v5p host consumes training omni7b.

    python benchmarks/data_pipeline.py [--scenes 600] [--batches 20]

Feeds packed toy-world batches at the omni7b sequence length (3072) through the Grain pipeline
with 0, 1 and 2 worker processes and prints tokens/s per host (token slots, and real tokens
excluding padding). The demand side is analytic, at 50 % MFU:

    flops/token = 6 * N + 12 * layers * seq_len * hidden     (weights fwd+bwd + attention scores)
    tokens/s per host = chips_per_host * peak_flops * MFU / (flops/token)
"""

from __future__ import annotations

import argparse
import tempfile
import time

from omnijax.config import DataConfig
from omnijax.data.pipeline import Batches
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec

OMNI7B = dict(params=7.6e9, layers=28, hidden=3584, seq_len=3072)
V5P = dict(peak_flops=459e12, chips_per_host=4)
MFU = 0.5


def required_tokens_per_second() -> tuple[float, float]:
  flops_per_token = 6 * OMNI7B["params"] + 12 * OMNI7B["layers"] * OMNI7B["seq_len"] * OMNI7B["hidden"]
  return V5P["chips_per_host"] * V5P["peak_flops"] * MFU / flops_per_token, flops_per_token


def measure(config: DataConfig, vocab, batches: int) -> tuple[float, float]:
  loader = Batches(config, vocab)
  try:
    next(loader)  # worker start-up and first fill are not steady state
    start, slots, real = time.perf_counter(), 0, 0
    for _ in range(batches):
      batch = next(loader)
      slots += batch["tokens"].size
      real += int((batch["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - start
  finally:
    loader.close()
  return slots / elapsed, real / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scenes", type=int, default=600)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--global-batch-size", type=int, default=16)
  args = parser.parse_args()
  required, flops_per_token = required_tokens_per_second()
  print(f"demand: {flops_per_token:.3e} flop/token -> {required:,.0f} tokens/s per v5p host "
        f"(omni7b, seq {OMNI7B['seq_len']}, {MFU:.0%} MFU)")
  spec = ToyWorldSpec(n=args.scenes, seed=0)
  with tempfile.TemporaryDirectory() as out:
    prepare(out, spec)
    for workers in (0, 1, 2):
      config = DataConfig(dir=out, seq_len=OMNI7B["seq_len"], global_batch_size=args.global_batch_size,
                          num_workers=workers)
      slots, real = measure(config, spec.vocab, args.batches)
      print(f"workers={workers}: {slots:>12,.0f} token slots/s  {real:>12,.0f} real tokens/s  "
            f"ratio to demand {real / required:6.1f}x")


if __name__ == "__main__":
  main()
