"""Chance baselines: what a model that ignores its input scores on each task.

Such a model can at best give every sample the same response, so the baseline is one constant
response taken from the training split: the training response that scores best on the training
split itself under the task's headline. For an exact-match headline that is the most frequent
training response: the most frequent answer per question kind for vqa and svqa (the question's
kind is kept, the image ignored), the most frequent scene for t2i, s2i and toy-world captions
(ties, as when every training scene is distinct, go to the scene with the best object F1). For
a WER headline it is the training transcript with the fewest word edits to all the others (asr,
tts, captions off the toy world, and a toy-world caption's WER, a secondary figure). The
constant is then scored on the evaluated split with the task's own metrics, so every figure has
its chance value beside it.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from omnijax.data.tasks import IMAGE_TASKS
from omnijax.eval.metrics import reference_scenes, task_metrics
from omnijax.eval.wer import normalize, wer

# Training responses a baseline is chosen from (the first ones of each task, in file order):
# README's toy world has 1,700 a task; the WER medoid compares all pairs.
CHANCE_SAMPLES = 2048


def constant_responses(task: str, references: Sequence, kinds: Sequence[str | None] | None,
                       cells: int | None) -> dict[str | None, object]:
  """The constant response of a model that ignores its input, from the training references
  (`omnijax.generate.run.Output`s): {question kind: response} for vqa and svqa (on the toy
  world), and under the key None the response for every sample (or any other kind)."""
  if not references:
    raise ValueError(f"{task}: no training responses to take a chance baseline from")
  if task in IMAGE_TASKS or (task == "caption" and cells is not None):
    scenes = ([r.scene for r in references] if task in IMAGE_TASKS else
              reference_scenes(references, cells))
    return {None: references[_most_frequent_scene(scenes)]}
  if task in ("vqa", "svqa"):
    constants = {None: _most_frequent_text(references)}
    if kinds is not None and cells is not None:
      for kind in dict.fromkeys(k for k in kinds if k is not None):
        constants[kind] = _most_frequent_text([r for r, k in zip(references, kinds) if k == kind])
    return constants
  if task in ("caption", "asr"):
    return {None: references[_fewest_edits([r.text for r in references])]}
  if task == "tts":
    return {None: references[_fewest_edits([" ".join(r.words or []) for r in references])]}
  raise ValueError(f"no chance baseline for task {task!r}")


def chance_metrics(task: str, train_references: Sequence,
                   train_kinds: Sequence[str | None] | None, references: Sequence,
                   kinds: Sequence[str | None] | None, cells: int | None) -> dict[str, float]:
  """The task's metrics (`task_metrics`) of the constant responses chosen on the training
  split, given to every evaluated sample (by its question kind where it has one)."""
  constants = constant_responses(task, train_references, train_kinds, cells)
  given = [constants.get(kind, constants[None]) for kind in (kinds or [None] * len(references))]
  metrics = task_metrics(task, given, references, cells=cells, kinds=kinds)
  if task == "caption" and cells is not None:
    # A caption's WER, its secondary figure, has a constant of its own: the caption with the
    # fewest edits, which need not be the best scene (often a shorter caption).
    wordy = constant_responses(task, train_references, None, None)[None]
    metrics["wer"] = wer([r.text for r in references], [wordy.text] * len(references))
  return metrics


def _most_frequent_text(references: Sequence):
  counts = collections.Counter(" ".join(normalize(r.text)) for r in references)
  top = counts.most_common(1)[0][0]  # ties: the first seen
  return next(r for r in references if " ".join(normalize(r.text)) == top)


def _most_frequent_scene(scenes: Sequence) -> int:
  """Index of the most frequent scene; ties to the best object F1 on `scenes`, then the first.
  A constant scene c matches sum over its objects of how many scenes hold each, so its corpus
  F1 is 2 x that / (len(scenes) x len(c) + all objects)."""
  counts = collections.Counter(scene.key for scene in scenes)
  holding = collections.Counter(thing for scene in scenes for thing in scene.things)
  objects = sum(len(scene.things) for scene in scenes)

  def merit(index: int) -> tuple[int, float]:
    scene = scenes[index]
    matched = sum(holding[thing] for thing in scene.things)
    return counts[scene.key], 2 * matched / max(len(scenes) * len(scene.things) + objects, 1)

  return max(range(len(scenes)), key=merit)


def _fewest_edits(texts: Sequence[str]) -> int:
  """Index of the text with the fewest word edits (substitutions, deletions, insertions) to all
  the texts, i.e. the best corpus WER as a constant hypothesis; ties to the first."""
  words = [normalize(text) for text in texts]
  distinct = list(dict.fromkeys(map(tuple, words)))
  edits = process.cdist([list(d) for d in distinct], words, scorer=Levenshtein.distance,
                        dtype=np.int64).sum(axis=1)
  best = distinct[int(np.argmin(edits))]
  return next(i for i, w in enumerate(words) if tuple(w) == best)
