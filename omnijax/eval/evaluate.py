"""`omnijax eval`: every task on a held-out split at several step counts -> JSON and plots.

The JSON is keyed by task, then by step count ("4", "8", ..., and "default": the task's own
setting from the decode table): each entry holds the task's metrics, `quality`, the mean
forward passes and the decode seconds per sample (compilation excluded), and under `chance`
the same metrics of a model that ignores its input (`omnijax.eval.chance`, chosen on the
training split). A generator with the `ar` decoder has no steps to sweep (one token per forward
pass): only "default". Every sample, with its prompt, reference, output and score, goes to a
JSON Lines file beside it (`samples_beside`), so any figure can be audited and re-scored.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

from omnijax.messages import quoted
from omnijax.data import shards
from omnijax.data.record import Sample
from omnijax.data.tasks import TASKS
from omnijax.data.toyworld import scenes as scenes_lib
from omnijax.diffusion.postprocess import split_modalities
from omnijax.eval.chance import CHANCE_SAMPLES, chance_metrics
from omnijax.eval.metrics import sample_scores, task_metrics
from omnijax.files import atomic_write, atomic_write_text
from omnijax.generate.run import Generator, Output, read_samples

DEFAULT = "default"


@dataclasses.dataclass
class TaskRun:
  """One task's evaluated samples, kept for the samples picture and `samples.jsonl`."""

  samples: list[Sample]
  references: list[Output]
  kinds: list[str | None] | None  # each sample's question kind (vqa, svqa on the toy world)
  scenes: list | None  # the scene each question is about (vqa, svqa on the toy world)
  outputs: dict[str, list[Output]]  # by steps key
  scores: dict[str, list[float | None]]  # each sample's score (`sample_scores`), by steps key


def parse_tasks(text: str) -> list[str]:
  if text == "all":
    return list(TASKS)
  tasks = [t.strip() for t in text.split(",") if t.strip()]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    raise ValueError(f"--tasks: unknown task {quoted(unknown[0] if unknown else text)}; known: "
                     f"all, {', '.join(TASKS)}")
  return tasks


def parse_steps(text: str) -> list[int]:
  try:
    steps = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--steps={quoted(text)}: expected comma-separated integers, e.g. 4,8,16,64") \
        from None
  if not steps or min(steps) < 1:
    raise ValueError(f"--steps={quoted(text)}: expected positive step counts")
  return steps


def step_counts(generator: Generator, steps: Sequence[int]) -> list[int | None]:
  """The step counts each task is decoded at (None: the task's default)."""
  return [None] if generator.decoder == "ar" else [*steps, None]


def evaluate(generator: Generator, split_dir: str | pathlib.Path, tasks: Sequence[str],
             steps: Sequence[int], *, limit: int | None = None, progress=None,
             keep_outputs: bool = False, train_split: str | None = None,
             overrides: dict | None = None) -> tuple[dict, dict]:
  """(results, kept): results[task][str(steps) | "default"] = metrics; kept[task] = the task's
  `TaskRun` when keep_outputs. With `train_split` (a split directory beside `split_dir`), each
  entry's `chance` holds the chance baseline's metrics; a missing training split is noted on
  stderr and leaves them out. `overrides`: decode settings applied to every task's row."""
  results: dict = {}
  kept: dict = {}
  cells = generator.toy_spec.cells if generator.toy_spec is not None else None
  train_dir = _training_split(split_dir, train_split)
  for task in tasks:
    samples = read_samples(split_dir, task, limit)
    if not samples:
      raise ValueError(f"{split_dir}: no {task} samples")
    requests = [generator.request_from_sample(s) for s in samples]
    references = [generator.postprocess(task, s.response, 0) for s in samples]
    kinds = question_kinds(generator, task, samples)
    scenes = question_scenes(generator, task, samples)
    chance = None
    if train_dir is not None:
      trained_on = read_samples(train_dir, task, CHANCE_SAMPLES)
      trained_references = [generator.postprocess(task, s.response, 0) for s in trained_on]
      chance = chance_metrics(task, trained_references, question_kinds(generator, task, trained_on),
                              references, kinds, cells)
    by_steps: dict[str, dict] = {}
    run = TaskRun(samples, references, kinds, scenes, {}, {})
    for count in step_counts(generator, steps):
      outputs, seconds = generator.decode(requests, steps=count, progress=progress,
                                          **(overrides or {}))
      metrics = task_metrics(task, outputs, references, cells=cells, kinds=kinds, scenes=scenes)
      metrics.update(forward_passes=float(np.mean([o.forward_passes for o in outputs])),
                     seconds_per_sample=seconds / len(outputs), samples=len(outputs))
      if chance is not None:
        metrics["chance"] = chance
      key = DEFAULT if count is None else str(count)
      by_steps[key] = metrics
      if keep_outputs:
        run.outputs[key] = outputs
        run.scores[key] = sample_scores(task, outputs, references, cells=cells)
    results[task] = by_steps
    if keep_outputs:
      kept[task] = run
  return results, kept


def _training_split(split_dir, train_split: str | None) -> pathlib.Path | None:
  if train_split is None:
    return None
  train_dir = pathlib.Path(split_dir).parent / train_split
  if not (train_dir / shards.MANIFEST).is_file():
    print(f"no training split at {train_dir}: the results get no chance baselines",
          file=sys.stderr)
    return None
  return train_dir


def question_kinds(generator: Generator, task: str,
                   samples: Sequence[Sample]) -> list[str | None] | None:
  """Each sample's question kind (`scenes.QUESTION_KINDS`) for vqa and svqa on the toy world,
  read from its prompt (vqa: the text line that is a question; svqa: the spoken question's
  words); None for other tasks and data."""
  if generator.toy_spec is None or task not in ("vqa", "svqa"):
    return None
  kinds = []
  for sample in samples:
    parts = split_modalities(sample.prompt, generator.vocab)
    if task == "vqa":
      lines = generator.template.tokenizer.decode(parts.text.tolist()).splitlines()
      kinds.append(next(filter(None, map(scenes_lib.parse_question, lines)), None))
    else:
      spoken = generator.toy_spec.speech.decode(parts.speech)
      kinds.append(scenes_lib.parse_question(" ".join(spoken)))
  return kinds


def question_scenes(generator: Generator, task: str, samples: Sequence[Sample]) -> list | None:
  """The scene each vqa and svqa question is about on the toy world, its prompt's image read
  back (`ImageCodebook.decode`); None for other tasks and data."""
  if generator.toy_spec is None or task not in ("vqa", "svqa"):
    return None
  return [generator.toy_spec.images.decode(split_modalities(sample.prompt, generator.vocab).image)
          for sample in samples]


def check_overrides(generator: Generator, split_dir, tasks, steps, overrides: dict) -> None:
  """Raises the error a decode would raise for these settings (one task's first sample at each
  step count), before anything decodes."""
  for task in tasks:
    requests = [generator.request_from_sample(s) for s in read_samples(split_dir, task, 1)]
    for count in step_counts(generator, steps):
      generator.check_settings(requests, steps=count, **overrides)


def batches_needed(generator: Generator, split_dir, tasks, steps, limit) -> int:
  total = 0
  for task in tasks:
    requests = [generator.request_from_sample(s) for s in read_samples(split_dir, task, limit)]
    total += generator.batches(requests) * len(step_counts(generator, steps))
  return total


def write_json(path: str | pathlib.Path, results: dict, meta: dict) -> None:
  atomic_write_text(path, json.dumps({"meta": meta, **results}, indent=1) + "\n")


def samples_beside(out: pathlib.Path) -> pathlib.Path:
  """The samples file of a results JSON: `samples.jsonl` beside `eval.json` (the main job's and
  the default), `NAME_samples.jsonl` beside any other `NAME.json`, so evaluations written to
  one directory under different names keep their own samples."""
  return out.with_name("samples.jsonl" if out.name == "eval.json" else f"{out.stem}_samples.jsonl")


def write_samples(path: str | pathlib.Path, generator: Generator, kept: dict) -> None:
  """One JSON line a sample and step setting: task, steps, index, prompt (readable, media code
  runs abbreviated), question kind and the scene it is about (vqa, svqa), reference, output and
  score; what the metrics read is there in full (text, spoken words, scene, image and speech codes)."""
  cells = generator.toy_spec.cells if generator.toy_spec is not None else None
  lines = []
  for task, run in kept.items():
    prompts = [generator.template.readable(sample.prompt) for sample in run.samples]
    for key, outputs in run.outputs.items():
      for index, (prompt, reference, output, score) in enumerate(
          zip(prompts, run.references, outputs, run.scores[key])):
        record = {"task": task, "steps": key, "index": index, "prompt": prompt}
        if run.kinds is not None:
          record["question_kind"] = run.kinds[index]
        if run.scenes is not None:
          record["question_scene"] = run.scenes[index].key
        record.update(reference=_described(task, reference, cells),
                      output=_described(task, output, cells), score=score,
                      forward_passes=output.forward_passes)
        lines.append(json.dumps(record) + "\n")
  atomic_write_text(path, "".join(lines))


def _described(task: str, output: Output, cells: int | None) -> dict:
  """What an output says, as JSON: its text, and its spoken words, scene (a caption's as parsed;
  `Scene.key`, null for no scene) and media codes where it has them."""
  described: dict = {"text": output.text}
  if output.words is not None:
    described["words"] = output.words
  if task == "caption" and cells is not None:
    scene = scenes_lib.parse_caption(output.text, cells)
    described["scene"] = None if scene is None else scene.key
  if output.scene is not None:
    described["scene"] = output.scene.key
  for name in ("image_codes", "speech_codes"):
    codes = getattr(output, name)
    if codes is not None:
      described[name] = np.asarray(codes).tolist()
  return described


def format_table(results: dict) -> str:
  """A Markdown table: quality (and forward passes) per task and step count, and the chance
  baseline's quality where the results have one."""
  keys = sorted({k for by_steps in results.values() for k in by_steps},
                key=lambda k: (k == DEFAULT, int(k) if k != DEFAULT else 0))
  with_chance = any(m.get("chance") for by_steps in results.values() for m in by_steps.values())
  header = [f"{k} steps" for k in keys] + (["chance"] if with_chance else [])
  lines = ["| task | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
  for task, by_steps in results.items():
    cells = []
    for key in keys:
      m = by_steps.get(key)
      cells.append("" if m is None else f"{100 * m['quality']:.1f} % ({m['forward_passes']:.0f} fp)")
    if with_chance:
      chance = chance_quality(by_steps)
      cells.append("" if chance is None else f"{100 * chance:.1f} %")
    lines.append(f"| {task} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def chance_quality(by_steps: dict) -> float | None:
  """A task's chance baseline quality (the same at every step count), or None without one: the
  chance column of eval's table and README's."""
  return next((m["chance"]["quality"] for m in by_steps.values() if m.get("chance")), None)


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
    chance = chance_quality(by_steps)
    if chance is not None:  # what ignoring the input scores: the line the task must clear
      axis.axhline(100 * chance, color=line.get_color(), linestyle=":", linewidth=1)
      lowest = min(lowest, 100 * chance)
    lowest = min(lowest, *(p[1] for p in points))
  axis.set_xscale("log", base=2)
  axis.set_xlabel("forward passes per sample (= decoding steps; star: the task's default)\n"
                  "dotted: chance, a model that ignores its input")
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
  n = min(rows, len(t2i.references) if t2i else rows,
          len(caption.references) if caption else rows)
  figure, axes = plt.subplots(n, 3, figsize=(9.5, 2.3 * n), squeeze=False,
                              gridspec_kw={"width_ratios": [1, 1, 1.6]})
  for row in range(n):
    left, middle, right = axes[row]
    for axis in (left, middle, right):
      axis.axis("off")
    if t2i:
      generated, truth = t2i.outputs[DEFAULT][row], t2i.references[row]
      left.imshow(codebook.to_rgb(generated.image_codes))
      left.set_title("t2i: generated" + (" (exact)" if generated.scene == truth.scene else ""),
                     fontsize=8)
      middle.imshow(codebook.to_rgb(truth.image_codes))
      middle.set_title("ground truth", fontsize=8)
      right.text(0, 0.75, "asked: " + _wrap(scenes_lib.caption(truth.scene)), fontsize=7.5, va="top",
                 wrap=True)
    if caption:
      right.text(0, 0.35, "caption task\n model: " + _wrap(caption.outputs[DEFAULT][row].text)
                 + "\n truth: " + _wrap(caption.references[row].text), fontsize=7.5, va="top")
  figure.tight_layout()
  atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
  plt.close(figure)


def _wrap(text: str, width: int = 48) -> str:
  import textwrap

  return "\n   ".join(textwrap.wrap(text, width)) or "(empty)"
