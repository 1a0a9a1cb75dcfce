"""Sampler throughput against a release-style loop, and t2i quality against forward passes.

  python benchmarks/generate.py --checkpoint runs/toy [--samples 16] [--baseline-rows 4]

1. Throughput: the same model, the same t2i prompts and canvas, one token per step (steps =
   canvas, the release's t2i default) in both: omnijax's sampler (batch 16, one compiled loop)
   vs a release-style loop (batch 1, a full forward each step from Python, the selection in
   NumPy). The baseline decodes `--baseline-rows` prompts; images per second are compared.
2. t2i at 4/8/16/64 steps and with threshold decoding: exact-scene accuracy, object accuracy
   and forward passes per image, on the held-out split.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401 - environment for libtpu

import jax  # noqa: E402
import numpy as np  # noqa: E402

from omnijax.diffusion.sampler import decode  # noqa: E402
from omnijax.diffusion.settings import DecodeSettings  # noqa: E402
from omnijax.eval.metrics import task_metrics  # noqa: E402
from omnijax.generate import settings  # noqa: E402
from omnijax.generate.run import open_run, read_samples  # noqa: E402


def release_style_decode(model, vocab, prompt: np.ndarray, canvas: int) -> np.ndarray:
  """Batch 1, one token per step, the full sequence recomputed every step, Python control flow
  (greedy maskgit_plus; the release's loop structure, with a jitted forward)."""
  forward = jax.jit(lambda ids: model(ids))
  x = np.concatenate([prompt, np.full(canvas, vocab.mask_id)]).astype(np.int32)
  start = len(prompt)
  for _ in range(canvas):
    logits = np.array(forward(x[None]), np.float32)[0, start - 1:-1]
    logits[:, vocab.size:] = -np.inf
    logits[:, vocab.mask_id] = -np.inf
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    masked = x[start:] == vocab.mask_id
    position = int(np.argmax(np.where(masked, probs.max(-1), -np.inf)))
    x[start + position] = int(probs[position].argmax())
  return x[start:]


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--checkpoint", required=True, help="a trained toy-world workdir")
  parser.add_argument("--samples", type=int, default=16)
  parser.add_argument("--baseline-rows", type=int, default=4)
  parser.add_argument("--quality-samples", type=int, default=32)
  args = parser.parse_args()

  run, generator, split_dir = open_run(args.checkpoint, batch_size=args.samples)
  model, vocab = run.model, generator.vocab
  samples = read_samples(split_dir, "t2i", args.samples)
  prompts = [s.prompt for s in samples]
  canvas = settings.canvas_length("t2i", generator.constants, prompt_tokens=0, text_tokens=0)
  print(f"model: {run.config.model.name} ({args.checkpoint}, step {run.step}); "
        f"{jax.default_backend()}, {jax.device_count()} device(s); t2i canvas {canvas}")

  # 1. Throughput, one token per step on both sides.
  one_a_step = DecodeSettings(canvas=canvas, steps=canvas)
  decode(model, vocab, prompts, one_a_step)  # compile
  ours = decode(model, vocab, prompts, one_a_step)
  ours_rate = len(prompts) / ours.seconds
  release_style_decode(model, vocab, prompts[0], canvas)  # compile
  start = time.perf_counter()
  for prompt in prompts[:args.baseline_rows]:
    release_style_decode(model, vocab, prompt, canvas)
  baseline_rate = args.baseline_rows / (time.perf_counter() - start)
  default = settings.decode_settings("t2i", canvas, vocab)
  decode(model, vocab, prompts, default)  # compile
  with_defaults = decode(model, vocab, prompts, default)
  print(f"| sampler, batch {len(prompts)}, {canvas} steps (1 token/step) | "
        f"{ours_rate:.2f} images/s | {ours.loop_steps} passes |")
  print(f"| sampler, batch {len(prompts)}, t2i defaults (entropy, penalties, top-p/k) | "
        f"{len(prompts) / with_defaults.seconds:.2f} images/s | {with_defaults.loop_steps} passes |")
  print(f"| release-style loop, batch 1, {canvas} steps | {baseline_rate:.2f} images/s | "
        f"{canvas} passes |")
  print(f"throughput ratio (sampler batch {len(prompts)} / release-style loop): "
        f"{ours_rate / baseline_rate:.1f}x")

  # 2. Quality against forward passes.
  print("| t2i decoding | exact scene | object accuracy | forward passes / image |")
  print("|---|---|---|---|")
  rows = [(f"{s} steps", dict(steps=s)) for s in (4, 8, 16, 64)]
  # Threshold decoding compares a probability: maskgit_plus confidence (the t2i default,
  # entropy, has negative confidences).
  rows += [(f"threshold {t}, maskgit_plus (steps <= {canvas})",
            dict(steps=canvas, threshold=t, alg="maskgit_plus")) for t in (0.9, 0.7, 0.5)]
  held_out = read_samples(split_dir, "t2i", args.quality_samples)
  requests = [generator.request_from_sample(s) for s in held_out]
  references = [generator.postprocess("t2i", s.response, 0) for s in held_out]
  for label, kwargs in rows:
    outputs, _ = generator.decode(requests, **kwargs)
    m = task_metrics("t2i", outputs, references)
    m["forward_passes"] = float(np.mean([o.forward_passes for o in outputs]))
    print(f"| {label} | {100 * m['exact_scene']:.1f} % | {100 * m['object_accuracy']:.1f} % | "
          f"{m['forward_passes']:.1f} |")


if __name__ == "__main__":
  main()
