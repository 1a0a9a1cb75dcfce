"""Decode speed at equal quality (issue 20): the diffusion sampler, uncached and with the prefix
and dual KV caches, against the autoregressive baseline on the same backbone.

  python benchmarks/decode_speed.py --diffusion runs/toy --ar runs/toy_ar \
      --tasks t2i,tts,caption --samples 16 --out decode_speed.json

The two workdirs are trained with the same config except `train.objective.kind` (llada or omni
against ar). Per task, on the first `--samples` held-out samples: the AR model (one token per
forward pass, KV-cached), and the diffusion model at each `--steps` count and the task's default,
each with cache none, prefix and dual, without and with threshold decoding (`--threshold`, on
maskgit_plus confidence: the tasks' entropy confidence is not a probability). Every diffusion
row decodes in blocks of `--block-size` (the dual cache runs one block between refreshes; with
0 it is the prefix cache), refreshing at block boundaries and every `--cache-refresh` steps.

Columns: quality as `omnijax eval` measures it (omnijax.eval.evaluate: outputs parsed back by
meaning) beside its chance baseline; forward passes per sample; FLOPs per sample (`sample_flops`:
what the sample's own columns compute, padding excluded); decode seconds per sample at batch 1
and at batch `--batch` (compilation excluded), and the speed against the baseline run in the
same process: uncached diffusion at the same steps and threshold (for the AR row: uncached
diffusion at the task's default steps, no threshold). Writes the table (Markdown) to stdout and
everything to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import common  # noqa: F401 - environment for libtpu

import jax  # noqa: E402
import numpy as np  # noqa: E402

from omnijax.config import SAMPLER_CACHES  # noqa: E402
from omnijax.diffusion.sampler import Plan  # noqa: E402
from omnijax.eval.evaluate import (DEFAULT, chance_quality, evaluate, parse_steps,  # noqa: E402
                                    parse_tasks)
from omnijax.files import atomic_write_text  # noqa: E402
from omnijax.generate import settings as settings_lib  # noqa: E402
from omnijax.generate.run import open_run, read_samples  # noqa: E402
from omnijax.train.flops import training_flops_per_token  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setup:
  """One decoding configuration of a row: the ar decoder, or diffusion at `steps` (None: the
  task's default) with a cache mode and an optional confidence threshold."""

  decoder: str
  steps: int | None = None
  cache: str = "none"
  threshold: float | None = None

  @property
  def steps_key(self) -> str:
    return DEFAULT if self.steps is None else str(self.steps)

  def baseline(self) -> Setup:
    """The uncached diffusion setup this one's speed is compared with."""
    if self.decoder == "ar":
      return Setup("diffusion")
    return Setup("diffusion", self.steps, "none", self.threshold)


def setups(step_counts, threshold: float) -> list[Setup]:
  """The AR row, then diffusion at each step count and the default, without and with the
  threshold, each without cache, with the prefix cache and with the dual cache."""
  rows = [Setup("ar")]
  for steps in [*step_counts, None]:
    for row_threshold in (None, threshold):
      rows += [Setup("diffusion", steps, cache, row_threshold) for cache in SAMPLER_CACHES]
  return rows


def forward_flops(model_config, queries: int, keys: int) -> float:
  """FLOPs of a forward pass of `queries` columns attending to `keys` keys: the forward third
  of omnijax.train.flops' training count at seq_len=keys, i.e. per query 2 x the matmul
  parameters (lm_head included) + 4 x layers x keys x heads x head_dim (full attention: flops.py
  does not halve it for causal attention, so an AR prompt's prefill is counted as bidirectional)."""
  return queries * training_flops_per_token(model_config, keys) / 3


def sample_flops(model_config, setup: Setup, prompt_lengths, canvas: int, forward_passes: int,
                 whole_row_passes: int | None, window: int) -> float:
  """FLOPs of one sample's decode, over its forward rows (`prompt_lengths`: the prompt, and with
  CFG the unconditional prompt, whose row runs every pass too).

  AR: the prompt's prefill (its first token comes from it), then one query per further token
  against the prompt and the tokens before it. Diffusion: a whole-row pass runs prompt + canvas
  columns; a cached pass (the others) runs the window (the canvas with the prefix cache, the
  block with the dual cache) and the column before it, against all prompt + canvas keys."""
  total = 0.0
  for prompt in prompt_lengths:
    if setup.decoder == "ar":
      total += forward_flops(model_config, prompt, prompt)
      total += sum(forward_flops(model_config, 1, prompt + t) for t in range(1, forward_passes))
    else:
      length = prompt + canvas
      cached = forward_passes - whole_row_passes
      total += (whole_row_passes * forward_flops(model_config, length, length)
                + cached * forward_flops(model_config, window + 1, length))
  return total


def decode_overrides(setup: Setup, block_size: int, cache_refresh: int) -> dict:
  """The decode settings a diffusion setup changes in every task's table row."""
  if setup.decoder == "ar":
    return {}
  overrides = dict(cache=setup.cache, cache_refresh=cache_refresh, block_size=block_size)
  if setup.threshold is not None:
    overrides.update(threshold=setup.threshold, alg="maskgit_plus")
  return overrides


def measure(generators: dict, split_dir, task: str, setups_: list[Setup], *, samples: int,
            batches: tuple[int, ...], block_size: int, cache_refresh: int,
            train_split: str | None) -> list[dict]:
  """One row per setup: quality and chance (from the largest batch's decode), forward passes,
  FLOPs and seconds per sample at each batch size (with the ratio to the setup's baseline)."""
  requests = [generators["diffusion"].request_from_sample(s)
              for s in read_samples(split_dir, task, samples)]
  step_counts = sorted({s.steps for s in setups_ if s.steps is not None})
  # One evaluate call decodes every step count (and the default) of a decoder, cache and
  # threshold, as `omnijax eval` does.
  groups: dict[tuple, list[Setup]] = {}
  for setup in setups_:
    groups.setdefault((setup.decoder, setup.cache, setup.threshold), []).append(setup)
  measured: dict[Setup, dict] = {}
  chance = None
  for (decoder, _, _), members in groups.items():
    generator = generators[decoder]
    overrides = decode_overrides(members[0], block_size, cache_refresh)
    seconds = {}
    for batch in batches:
      generator.batch_size = batch
      results, kept = evaluate(generator, split_dir, [task], step_counts, limit=samples,
                               keep_outputs=True, overrides=overrides,
                               train_split=train_split if chance is None else None)
      chance = chance_quality(results[task]) if chance is None else chance
      for setup in members:
        seconds.setdefault(setup, {})[batch] = results[task][setup.steps_key]["seconds_per_sample"]
    for setup in members:
      metrics = results[task][setup.steps_key]
      outputs = kept[task].outputs[setup.steps_key]
      measured[setup] = dict(
          quality=metrics["quality"], forward_passes=metrics["forward_passes"],
          flops_per_sample=float(np.mean([
              output_flops(generator, setup, request, output, block_size, cache_refresh)
              for request, output in zip(requests, outputs)])),
          seconds_per_sample=seconds[setup])
  rows = []
  for setup in setups_:
    row = dict(task=task, decoder=setup.decoder, steps=setup.steps_key, cache=setup.cache,
               threshold=setup.threshold, chance=chance, **measured[setup])
    baseline = measured[setup.baseline()]["seconds_per_sample"]
    row["speedup"] = {batch: baseline[batch] / row["seconds_per_sample"][batch]
                      for batch in batches}
    rows.append(row)
  return rows


def output_flops(generator, setup: Setup, request, output, block_size: int,
                 cache_refresh: int) -> float:
  """`sample_flops` of one decoded request."""
  model_config = generator.model.config
  prompt_lengths = [len(request.prompt)]
  window = request.canvas
  diffusion = setup.decoder == "diffusion"
  settings = settings_lib.decode_settings(
      request.task, request.canvas, generator.vocab, constants=generator.constants,
      **(dict(steps=setup.steps, **decode_overrides(setup, block_size, cache_refresh))
         if diffusion else {}))
  if settings.cfg > 0:
    prompt_lengths.append(len(request.uncond))
  if diffusion:
    window = Plan.of(settings, generator.vocab).window
  return sample_flops(model_config, setup, prompt_lengths, request.canvas,
                      output.forward_passes, output.whole_row_passes, window)


def format_table(rows: list[dict], batches: tuple[int, ...]) -> str:
  """Markdown, one line per row."""
  header = (["task", "decoder", "steps", "threshold", "cache", "quality (chance)",
             "passes", "MFLOP/sample"]
            + [f"s/sample b{b}" for b in batches] + [f"speed b{b}" for b in batches])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    chance = "" if row["chance"] is None else f" ({100 * row['chance']:.1f})"
    cells = [row["task"], row["decoder"], "-" if row["decoder"] == "ar" else row["steps"],
             "-" if row["threshold"] is None else f"{row['threshold']:g}",
             "-" if row["decoder"] == "ar" else row["cache"],
             f"{100 * row['quality']:.1f}{chance}", f"{row['forward_passes']:.1f}",
             f"{row['flops_per_sample'] / 1e6:.1f}"]
    cells += [f"{row['seconds_per_sample'][b] * 1e3:.1f} ms" for b in batches]
    cells += [f"{row['speedup'][b]:.2f}x" for b in batches]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--diffusion", required=True, help="the diffusion model's workdir")
  parser.add_argument("--ar", required=True, help="the AR model's workdir (train.objective.kind"
                      "=ar, otherwise the same config)")
  parser.add_argument("--tasks", default="t2i,tts,caption")
  parser.add_argument("--samples", type=int, default=16, help="held-out samples a task")
  parser.add_argument("--steps", default="4,10", help="diffusion step counts, besides the default")
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument("--block-size", type=int, default=32)
  parser.add_argument("--cache-refresh", type=int, default=0)
  parser.add_argument("--batch", type=int, default=16, help="the large batch (beside batch 1)")
  parser.add_argument("--split", default="heldout")
  parser.add_argument("--out", default="decode_speed.json")
  args = parser.parse_args(argv)

  tasks, step_counts = parse_tasks(args.tasks), parse_steps(args.steps)
  diffusion_run, diffusion, split_dir = open_run(args.diffusion, split=args.split)
  ar_run, ar, _ = open_run(args.ar, split=args.split, decoder="ar")
  if diffusion_run.config.model != ar_run.config.model:
    print(f"{args.ar}: its model config differs from {args.diffusion}'s; the comparison needs "
          "the same backbone", file=sys.stderr)
    return 2
  batches = (1, args.batch)
  print(f"diffusion: {args.diffusion} (step {diffusion_run.step}, "
        f"{diffusion_run.config.train.objective.kind}); ar: {args.ar} (step {ar_run.step}); "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}); {args.samples} samples a "
        f"task; block size {args.block_size}, cache refresh {args.cache_refresh}", flush=True)
  rows = []
  for task in tasks:
    rows += measure({"diffusion": diffusion, "ar": ar}, split_dir, task,
                    setups(step_counts, args.threshold), samples=args.samples, batches=batches,
                    block_size=args.block_size, cache_refresh=args.cache_refresh,
                    train_split=diffusion_run.config.data.split)
    print(f"{task}: done", file=sys.stderr, flush=True)
  table = format_table(rows, batches)
  print(table)
  meta = dict(diffusion=str(args.diffusion), ar=str(args.ar), samples=args.samples,
              block_size=args.block_size, cache_refresh=args.cache_refresh,
              threshold=args.threshold, batches=list(batches), backend=jax.default_backend(),
              device=jax.devices()[0].device_kind)
  atomic_write_text(pathlib.Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=1)
                    + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
