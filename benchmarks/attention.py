"""Attention kernels on GPU: Pallas flash (Triton) vs XLA vs cuDNN, forward and forward+backward.

Default (needs a GPU): L=4096, D=128, bf16, rows holding one segment and rows packed with 8.
Every backend runs in this process against the same inputs, and ratios are to XLA's time.

  python benchmarks/attention.py                      # the GPU benchmark
  python benchmarks/attention.py --small --interpret  # tiny shapes on CPU, Pallas interpreted
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from omnijax.kernels import flash_attention
from omnijax.kernels.cudnn import cudnn_attention
from omnijax.kernels.reference import xla_attention


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny shapes (L=256, D=64)")
  parser.add_argument("--interpret", action="store_true", help="run the Pallas kernel in "
                      "interpret mode (CPU); cuDNN is skipped without a GPU")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=16)
  parser.add_argument("--block-q", type=int, default=64)
  parser.add_argument("--block-k", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=20)
  return parser.parse_args()


def _shapes(args):
  if args.small:
    return dict(batch=1, length=256, heads=2, kv_heads=1, head_dim=64)
  return dict(batch=args.batch, length=4096, heads=args.heads, kv_heads=args.kv_heads,
              head_dim=128)


def _segment_ids(batch, length, segments):
  """Rows packed with `segments` equal segments (ids 1..segments)."""
  ids = jnp.arange(length, dtype=jnp.int32) * segments // length + 1
  return jnp.broadcast_to(ids, (batch, length))


def _median_ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _forward_backward(attention):
  def loss(q, k, v, segment_ids):
    return jnp.sum(attention(q, k, v, segment_ids).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def main():
  args = _parse_args()
  shape = _shapes(args)
  backends = {
      "xla": xla_attention,
      "pallas": functools.partial(flash_attention, platform="gpu", interpret=args.interpret,
                                  block_q=args.block_q, block_k=args.block_k),
  }
  if jax.default_backend() == "gpu":
    backends["cudnn"] = cudnn_attention
  print(f"device: {jax.devices()[0].device_kind}; {shape}, bf16, median of {args.repeats}")
  if "cudnn" not in backends:
    print("cudnn: skipped (needs a GPU)")

  keys = jax.random.split(jax.random.key(0), 3)
  b, l, h, kv, d = (shape[n] for n in ("batch", "length", "heads", "kv_heads", "head_dim"))
  q = jax.random.normal(keys[0], (b, l, h, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, l, kv, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, l, kv, d), jnp.bfloat16)

  print(f"{'segments':>8} {'backend':>7} {'fwd ms':>9} {'x xla':>6} {'fwd+bwd ms':>11} "
        f"{'x xla':>6} {'max|out-xla|':>12}")
  for segments in (1, 8):
    segment_ids = _segment_ids(b, l, segments)
    reference = jax.jit(xla_attention)(q, k, v, segment_ids).astype(jnp.float32)
    baseline = None
    for name, attention in backends.items():
      forward = _median_ms(jax.jit(attention), q, k, v, segment_ids, repeats=args.repeats)
      both = _median_ms(jax.jit(_forward_backward(attention)), q, k, v, segment_ids,
                        repeats=args.repeats)
      baseline = baseline or (forward, both)
      error = jnp.max(jnp.abs(jax.jit(attention)(q, k, v, segment_ids) - reference))
      print(f"{segments:>8} {name:>7} {forward:>9.3f} {baseline[0] / forward:>6.2f} "
            f"{both:>11.3f} {baseline[1] / both:>6.2f} {float(error):>12.2e}")
  print("x xla: XLA's time divided by the backend's (above 1 means faster than XLA)")


if __name__ == "__main__":
  main()
