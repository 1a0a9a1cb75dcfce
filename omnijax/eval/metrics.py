"""Per-task metrics on decoded outputs against the references (held-out responses).

t2i, s2i: the generated image parsed back to a scene: exact-scene accuracy and object accuracy;
caption, asr: WER; vqa: exact match; svqa: text-answer exact match and WER of the spoken
answer's words; tts: WER of the spoken words. `quality` is each task's headline, at most 1
(accuracy, or 1 - WER, which insertions can make negative; for svqa the lower of the two).
"""

from __future__ import annotations

from typing import Sequence

from omnijax.data.tasks import IMAGE_TASKS
from omnijax.eval.wer import normalize, wer



def scene_scores(generated: Sequence, references: Sequence) -> dict[str, float]:
  """exact_scene: fraction of images whose scene equals the reference exactly; object_accuracy:
  objects placed right (cell, shape and colour) over max(reference, generated) objects, summed
  over the corpus, so both missing and invented objects count against it."""
  exact = sum(g == r for g, r in zip(generated, references))
  matched = sum(len(set(g.things) & set(r.things)) for g, r in zip(generated, references))
  slots = sum(max(len(g.things), len(r.things)) for g, r in zip(generated, references))
  return {"exact_scene": exact / len(references), "object_accuracy": matched / max(slots, 1)}


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Fraction of hypotheses equal to their reference (lower-cased, whitespace-normalised)."""
  return sum(normalize(r) == normalize(h) for r, h in zip(references, hypotheses)) / len(references)


def _words(output) -> str:
  return " ".join(output.words or [])


def task_metrics(task: str, outputs: Sequence, references: Sequence) -> dict[str, float]:
  """Metrics of one task's outputs (`omnijax.generate.run.Output`) against the references
  (the same post-processing applied to the held-out responses)."""
  if task in IMAGE_TASKS:
    if any(o.scene is None for o in list(outputs) + list(references)):
      raise ValueError(f"{task}: scene metrics need the toy world's image parser")
    scores = scene_scores([o.scene for o in outputs], [r.scene for r in references])
    return {**scores, "quality": scores["exact_scene"]}
  if task in ("caption", "asr"):
    error = wer([r.text for r in references], [o.text for o in outputs])
    return {"wer": error, "quality": 1.0 - error}
  if task == "vqa":
    accuracy = exact_match([r.text for r in references], [o.text for o in outputs])
    return {"accuracy": accuracy, "quality": accuracy}
  if task == "tts":
    error = wer([_words(r) for r in references], [_words(o) for o in outputs])
    return {"wer": error, "quality": 1.0 - error}
  if task == "svqa":
    accuracy = exact_match([r.text for r in references], [o.text for o in outputs])
    error = wer([_words(r) for r in references], [_words(o) for o in outputs])
    return {"text_accuracy": accuracy, "speech_wer": error, "quality": min(accuracy, 1.0 - error)}
  raise ValueError(f"no metric for task {task!r}")
