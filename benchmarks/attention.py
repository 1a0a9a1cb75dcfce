"""Attention kernels on GPU: Pallas flash (Triton) vs cuDNN vs XLA, forward and forward+backward.

Default (needs a GPU): L = 4096 and 16384, D = 128, bf16, rows holding one segment ("dense") and
rows packed with 8 ("packed"). Every backend runs in this process on the same inputs; ratios
are to cuDNN's time (to XLA's without a GPU). On a Hopper GPU the Mosaic GPU kernel
(`mosaic_gpu`) joins, with its ratio to the Triton kernel; a backend that fails to compile or
run prints one line, the others go on, and the exit status is 1. `--tune` instead measures the Pallas kernel's
candidate block sizes per length and row kind against cuDNN (XLA without a GPU) and merges the
winners into the tuning table (omnijax/kernels/tuning.json) under this device's kind.

  python benchmarks/attention.py                      # the GPU benchmark
  python benchmarks/attention.py --tune               # measure blocks, write the tuning table
  python benchmarks/attention.py --small --interpret  # tiny shapes on CPU, Pallas interpreted
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from omnijax.kernels import flash_attention, flash_mgpu, tuning
from omnijax.kernels.cudnn import cudnn_attention
from omnijax.kernels.reference import xla_attention

# Block sizes --tune tries (block_q, block_k): Triton's power-of-two tiles.
CANDIDATES = ((64, 64), (128, 64), (64, 128), (128, 128))
SMALL_CANDIDATES = ((16, 16), (32, 32))
# XLA materialises fp32 [B, H, L, L] scores; beyond this it does not fit beside the rest.
XLA_MAX_SCORE_BYTES = 16 << 30


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny shapes (L=256, D=64)")
  parser.add_argument("--interpret", action="store_true", help="run the Pallas kernel in "
                      "interpret mode (CPU); cuDNN is skipped without a GPU")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=16)
  parser.add_argument("--lengths", default="4096,16384", help="comma-separated sequence lengths")
  parser.add_argument("--packed-segments", type=int, default=8,
                      help="segments in a packed row")
  parser.add_argument("--block-q", type=int, default=None,
                      help="Pallas query block (default: the tuning table's, else 64)")
  parser.add_argument("--block-k", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--tune", action="store_true",
                      help="measure candidate blocks and write the tuning table")
  parser.add_argument("--table", default=None,
                      help="tuning table to merge into (default: the package's)")
  args = parser.parse_args()
  if args.small:
    args.batch, args.heads, args.kv_heads, args.lengths = 1, 2, 1, "256"
  args.head_dim = 64 if args.small else 128
  args.lengths = [int(n) for n in args.lengths.split(",")]
  return args


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


def _inputs(args, length):
  keys = jax.random.split(jax.random.key(0), 3)
  normal = lambda key, heads: jax.random.normal(
      key, (args.batch, length, heads, args.head_dim), jnp.bfloat16)
  return normal(keys[0], args.heads), normal(keys[1], args.kv_heads), normal(keys[2], args.kv_heads)


def _cases(args):
  """(length, rows, segments, q, k, v, segment_ids) for every length and row kind."""
  for length in args.lengths:
    q, k, v = _inputs(args, length)
    for rows, segments in {"dense": 1, "packed": args.packed_segments}.items():
      yield length, rows, segments, q, k, v, _segment_ids(args.batch, length, segments)


def _pallas(args, rows, block_q, block_k):
  return functools.partial(flash_attention, platform="gpu", interpret=args.interpret,
                           rows=rows, block_q=block_q, block_k=block_k)


def _xla_fits(args, length):
  return args.batch * args.heads * length * length * 4 <= XLA_MAX_SCORE_BYTES


def _hopper(on_gpu):
  return on_gpu and flash_mgpu.unavailable_reason("gpu", jax.devices()[0].device_kind) is None


def _compare(args, on_gpu):
  if not _hopper(on_gpu):
    print("mosaic_gpu: skipped (needs a Hopper GPU)")
  print(f"{'L':>6} {'rows':>6} {'backend':>10} {'fwd ms':>9} {'x base':>6} {'fwd+bwd ms':>11} "
        f"{'x base':>6} {'max|out-ref|':>12}")
  failed = []
  for length, rows, _, q, k, v, segment_ids in _cases(args):
    backends = {}
    if _xla_fits(args, length):
      backends["xla"] = xla_attention
    else:
      print(f"{length:>6} {rows:>6} {'xla':>10} skipped: fp32 [B, H, L, L] scores of "
            f"{args.batch * args.heads * length * length * 4 / 2**30:.0f} GiB")
    if on_gpu:
      backends["cudnn"] = cudnn_attention
    backends["pallas"] = _pallas(args, rows, args.block_q, args.block_k)
    if _hopper(on_gpu):
      backends["mosaic_gpu"] = functools.partial(flash_attention, platform="mosaic_gpu")
    base_name = "cudnn" if on_gpu else "xla"
    times, reference = {}, None
    for name, attention in backends.items():
      try:
        forward = _median_ms(jax.jit(attention), q, k, v, segment_ids, repeats=args.repeats)
        both = _median_ms(jax.jit(_forward_backward(attention)), q, k, v, segment_ids,
                          repeats=args.repeats)
      except Exception as e:  # noqa: BLE001 -- an unverified backend must not stop the others
        print(f"{length:>6} {rows:>6} {name:>10} failed: {str(e).splitlines()[0][:200]}")
        failed.append(f"{name} (L={length} {rows})")
        continue
      times[name] = (forward, both)
      out = jax.jit(attention)(q, k, v, segment_ids).astype(jnp.float32)
      reference = out if reference is None else reference
      error = float(jnp.max(jnp.abs(out - reference)))
      base = times.get(base_name, (forward, both))
      print(f"{length:>6} {rows:>6} {name:>10} {forward:>9.3f} {base[0] / forward:>6.2f} "
            f"{both:>11.3f} {base[1] / both:>6.2f} {error:>12.2e}")
    if "mosaic_gpu" in times and "pallas" in times:
      (pallas_fwd, pallas_both), (mosaic_fwd, mosaic_both) = times["pallas"], times["mosaic_gpu"]
      print(f"{length:>6} {rows:>6} mosaic_gpu x pallas (Triton): fwd "
            f"{pallas_fwd / mosaic_fwd:.2f}, fwd+bwd {pallas_both / mosaic_both:.2f}")
  print(f"x base: {'cuDNN' if on_gpu else 'XLA'}'s time divided by the backend's (above 1 means "
        "faster); ref: the first backend's output (xla where it fits)")
  return failed


def _tune(args, on_gpu):
  device = jax.devices()[0].device_kind
  candidates = SMALL_CANDIDATES if args.small else CANDIDATES
  competitor_name = "cudnn" if on_gpu else "xla"
  competitor = cudnn_attention if on_gpu else xla_attention
  date = datetime.date.today().isoformat()
  entries = []
  for length, rows, segments, q, k, v, segment_ids in _cases(args):
    timed = {}
    for block_q, block_k in candidates:
      timed[block_q, block_k] = _median_ms(
          jax.jit(_forward_backward(_pallas(args, rows, block_q, block_k))), q, k, v,
          segment_ids, repeats=args.repeats)
    (block_q, block_k), best = min(timed.items(), key=lambda item: item[1])
    other = _median_ms(jax.jit(_forward_backward(competitor)), q, k, v, segment_ids,
                       repeats=args.repeats)
    fastest = "pallas" if best < other else competitor_name
    tried = ", ".join(f"{bq}x{bk} {ms:.3f}" for (bq, bk), ms in timed.items())
    source = (f"benchmarks/attention.py --tune ({device}, jax {jax.__version__}, bf16, "
              f"B{args.batch} H{args.heads}/{args.kv_heads} D{args.head_dim} L{length}, "
              f"{segments} segment(s) a row, fwd+bwd ms: pallas {tried}; {competitor_name} "
              f"{other:.3f}; {date})")
    entries.append(tuning.TuningEntry(device, args.head_dim, length, rows, block_q, block_k,
                                      fastest, source))
    print(f"L={length} {rows} rows: blocks {block_q}x{block_k} ({best:.3f} ms fwd+bwd; "
          f"{competitor_name} {other:.3f} ms; pallas x{competitor_name} {other / best:.2f}; "
          f"tried {tried})")
  tuning.write_table(entries, args.table)
  print(f"wrote {len(entries)} entries for {device!r} to {args.table or tuning.TABLE_PATH}")


def main():
  args = _parse_args()
  on_gpu = jax.default_backend() == "gpu"
  print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}, heads {args.heads}/"
        f"{args.kv_heads}, head dim {args.head_dim}, lengths {args.lengths}, bf16, median of "
        f"{args.repeats}, fwd+bwd = grads of q, k, v")
  if not on_gpu:
    print("cudnn: skipped (needs a GPU)")
  if args.tune:
    _tune(args, on_gpu)
  elif failed := _compare(args, on_gpu):
    raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
  main()
