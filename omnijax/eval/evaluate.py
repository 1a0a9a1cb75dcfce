"""`omnijax eval`: every task on a held-out split at several step counts -> JSON and plots.

The JSON is keyed by task, then by step count ("4", "8", ..., and "default": the task's own
setting from the decode table): each entry holds the task's metrics, `quality`, the mean
forward passes and the decode seconds per sample (compilation excluded). A generator with the
`ar` decoder has no steps to sweep (one token per forward pass): only "default".
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from omnijax.data.tasks import TASKS
from omnijax.data.toyworld import scenes as scenes_lib
from omnijax.eval.metrics import task_metrics
from omnijax.files import atomic_write, atomic_write_text
from omnijax.generate.run import Generator, Output, read_samples

DEFAULT = "default"


def parse_tasks(text: str) -> list[str]:
  if text == "all":
    return list(TASKS)
  tasks = [t.strip() for t in text.split(",") if t.strip()]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    raise ValueError(f"--tasks: unknown task {unknown[0] if unknown else text!r}; known: "
                     f"all, {', '.join(TASKS)}")
  return tasks


def parse_steps(text: str) -> list[int]:
  try:
    steps = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--steps={text!r}: expected comma-separated integers, e.g. 4,8,16,64") \
        from None
  if not steps or min(steps) < 1:
    raise ValueError(f"--steps={text!r}: expected positive step counts")
  return steps


def step_counts(generator: Generator, steps: Sequence[int]) -> list[int | None]:
  """The step counts each task is decoded at (None: the task's default)."""
  return [None] if generator.decoder == "ar" else [*steps, None]


def evaluate(generator: Generator, split_dir: str | pathlib.Path, tasks: Sequence[str],
             steps: Sequence[int], *, limit: int | None = None, progress=None,
             keep_outputs: bool = False) -> tuple[dict, dict]:
  """(results, outputs): results[task][str(steps) | "default"] = metrics; outputs[task] =
  (references, {steps key: outputs}) when keep_outputs (for the samples picture)."""
  results: dict = {}
  kept: dict = {}
  for task in tasks:
    samples = read_samples(split_dir, task, limit)
    if not samples:
      raise ValueError(f"{split_dir}: no {task} samples")
    requests = [generator.request_from_sample(s) for s in samples]
    references = [generator.postprocess(task, s.response, 0) for s in samples]
    by_steps: dict[str, dict] = {}
    task_outputs: dict[str, list[Output]] = {}
    for count in step_counts(generator, steps):
      outputs, seconds = generator.decode(requests, steps=count, progress=progress)
      metrics = task_metrics(task, outputs, references)
      metrics.update(forward_passes=float(np.mean([o.forward_passes for o in outputs])),
                     seconds_per_sample=seconds / len(outputs), samples=len(outputs))
      key = DEFAULT if count is None else str(count)
      by_steps[key] = metrics
      if keep_outputs:
        task_outputs[key] = outputs
    results[task] = by_steps
    if keep_outputs:
      kept[task] = (references, task_outputs)
  return results, kept


def batches_needed(generator: Generator, split_dir, tasks, steps, limit) -> int:
  total = 0
  for task in tasks:
    requests = [generator.request_from_sample(s) for s in read_samples(split_dir, task, limit)]
    total += generator.batches(requests) * len(step_counts(generator, steps))
  return total


def write_json(path: str | pathlib.Path, results: dict, meta: dict) -> None:
  atomic_write_text(path, json.dumps({"meta": meta, **results}, indent=1) + "\n")


def format_table(results: dict) -> str:
  """A Markdown table: quality (and forward passes) per task and step count."""
  keys = sorted({k for by_steps in results.values() for k in by_steps},
                key=lambda k: (k == DEFAULT, int(k) if k != DEFAULT else 0))
  lines = ["| task | " + " | ".join(f"{k} steps" for k in keys) + " |",
           "|---|" + "---|" * len(keys)]
  for task, by_steps in results.items():
    cells = []
    for key in keys:
      m = by_steps.get(key)
      cells.append("" if m is None else f"{100 * m['quality']:.1f} % ({m['forward_passes']:.0f} fp)")
    lines.append(f"| {task} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_quality(results: dict, path: str | pathlib.Path) -> None:
  """Quality (accuracy or 1 - WER) against decoding steps, one line per task."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axis = plt.subplots(figsize=(6.5, 4.2))
  lowest = 0.0
  for task, by_steps in results.items():
    # Each point sits at its mean forward passes: a step count's own, and the task's default
    # (its table setting, marked with a star) where its passes fall.
    points = sorted((m["forward_passes"], 100 * m["quality"], key == DEFAULT)
                    for key, m in by_steps.items())
    line, = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
    for passes, quality, is_default in points:
      if is_default:
        axis.plot(passes, quality, marker="*", markersize=13, color=line.get_color())
    lowest = min(lowest, *(p[1] for p in points))
  axis.set_xscale("log", base=2)
  axis.set_xlabel("forward passes per sample (= decoding steps; star: the task's default)")
  axis.set_ylabel("quality: accuracy or 1 - WER (%)")
  axis.set_ylim(lowest - 2, 101)
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8, ncol=2)
  figure.tight_layout()
  atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
  plt.close(figure)


def plot_samples(generator: Generator, kept: dict, path: str | pathlib.Path,
                 rows: int = 4) -> None:
  """Generated images beside the ground truth (t2i, with the caption asked for) and generated
  captions beside the reference ones, at the default steps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  codebook = generator.toy_spec.images
  t2i = kept.get("t2i")
  caption = kept.get("caption")
  n = min(rows, len(t2i[0]) if t2i else rows, len(caption[0]) if caption else rows)
  figure, axes = plt.subplots(n, 3, figsize=(9.5, 2.3 * n), squeeze=False,
                              gridspec_kw={"width_ratios": [1, 1, 1.6]})
  for row in range(n):
    left, middle, right = axes[row]
    for axis in (left, middle, right):
      axis.axis("off")
    if t2i:
      references, outputs = t2i
      generated, truth = outputs[DEFAULT][row], references[row]
      left.imshow(codebook.to_rgb(generated.image_codes))
      left.set_title("t2i: generated" + (" (exact)" if generated.scene == truth.scene else ""),
                     fontsize=8)
      middle.imshow(codebook.to_rgb(truth.image_codes))
      middle.set_title("ground truth", fontsize=8)
      right.text(0, 0.75, "asked: " + _wrap(scenes_lib.caption(truth.scene)), fontsize=7.5, va="top",
                 wrap=True)
    if caption:
      references, outputs = caption
      right.text(0, 0.35, "caption task\n model: " + _wrap(outputs[DEFAULT][row].text)
                 + "\n truth: " + _wrap(references[row].text), fontsize=7.5, va="top")
  figure.tight_layout()
  atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
  plt.close(figure)


def _wrap(text: str, width: int = 48) -> str:
  import textwrap

  return "\n   ".join(textwrap.wrap(text, width)) or "(empty)"
