"""Per-task metrics on decoded outputs against the references (held-out responses), scored by
what an output means wherever the toy world's grammar can read it.

t2i, s2i: the generated image parsed back to a scene; caption on the toy world: the caption
parsed back to a scene with the world's grammar (`parse_caption`; text outside the grammar is
no scene). Both: exact-scene accuracy, object F1 and object accuracy; captions keep their WER
as a secondary figure (off the toy world, their only one). asr: WER, and on the toy world the
transcript parsed back to a scene (exact scene, object F1 and accuracy, well-formed: secondary
figures that show whether the content words were heard, which WER hides behind the template's
words). tts: WER of the spoken words, and the same scene figures of those words. vqa: exact
match and, on the toy world, the accuracy per question kind (count, position, colour, shape) and
how many answers name a value of the kind asked; given the scene each question is about, also
whether the model binds the question to its object (`binding_scores`). svqa: the same for the
text answer, plus the spoken answer's exact match and WER.

`quality` is each task's headline, at most 1: exact-scene accuracy (t2i, s2i, toy captions),
exact match (vqa), 1 - WER (asr, tts, captions off the toy world; insertions can make it
negative), and for svqa the lower of text exact match and 1 - speech WER.
"""

from __future__ import annotations

from typing import Sequence

from omnijax.data.tasks import IMAGE_TASKS
from omnijax.data.toyworld.scenes import cell_names, parse_answer, parse_caption
from omnijax.eval.wer import normalize, wer


def scene_scores(generated: Sequence, references: Sequence) -> dict[str, float]:
  """exact_scene: fraction of outputs whose scene equals the reference exactly; object_f1:
  2 x objects right (cell, shape and colour) / (generated + reference objects), and
  object_accuracy: objects right / max(reference, generated) objects, both summed over the
  corpus, so missing and invented objects count against them. A generated None (a text that is
  no caption) is a wrong scene with no objects."""
  things = [set(g.things) if g is not None else set() for g in generated]
  exact = sum(g is not None and g == r for g, r in zip(generated, references))
  matched = sum(len(t & set(r.things)) for t, r in zip(things, references))
  slots = sum(max(len(t), len(r.things)) for t, r in zip(things, references))
  objects = sum(len(t) + len(r.things) for t, r in zip(things, references))
  return {"exact_scene": exact / len(references), "object_f1": 2 * matched / max(objects, 1),
          "object_accuracy": matched / max(slots, 1)}


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Fraction of hypotheses equal to their reference (lower-cased, whitespace-normalised)."""
  return sum(_same(r, h) for r, h in zip(references, hypotheses)) / len(references)


def _same(reference: str, hypothesis: str) -> bool:
  return normalize(reference) == normalize(hypothesis)


def reference_scenes(references: Sequence, cells: int) -> list:
  """The scenes reference captions describe; each must be a caption of the world's grammar."""
  scenes = [parse_caption(r.text, cells) for r in references]
  broken = next((i for i, scene in enumerate(scenes) if scene is None), None)
  if broken is not None:
    raise ValueError(f"caption reference {broken} is no caption of the toy world's grammar: "
                     f"{references[broken].text!r}")
  return scenes


def caption_scenes(outputs: Sequence, references: Sequence, cells: int) -> tuple[list, list]:
  """(generated scenes, None where the text is no caption; reference scenes)."""
  return [parse_caption(o.text, cells) for o in outputs], reference_scenes(references, cells)


def transcript_scenes(hypotheses: Sequence[str], references: Sequence[str],
                      cells: int | None) -> dict[str, float]:
  """Scene figures of transcripts (ASR text, TTS's spoken words) that speak a caption: exact
  scene, object F1 and accuracy, and the fraction that are captions at all; {} off the toy
  world."""
  if cells is None:
    return {}
  generated = [parse_caption(text, cells) for text in hypotheses]
  expected = [parse_caption(text, cells) for text in references]
  if any(scene is None for scene in expected):
    return {}  # transcripts of other speech (not the toy world's descriptions)
  well_formed = sum(scene is not None for scene in generated) / len(generated)
  return {**scene_scores(generated, expected), "well_formed": well_formed}


def answer_scores(references: Sequence[str], hypotheses: Sequence[str],
                  kinds: Sequence[str | None], cells: int) -> tuple[dict[str, float], float]:
  """({kind: accuracy on the questions of that kind (the value the answer names against the
  reference's)}, the fraction of answers that name a value of the kind asked). Samples whose
  question has no kind are left out of both."""
  right: dict[str, list[bool]] = {}
  well_formed = []
  for number, (reference, hypothesis, kind) in enumerate(zip(references, hypotheses, kinds)):
    if kind is None:
      continue
    expected = parse_answer(kind, reference, cells)
    if expected is None:
      raise ValueError(f"answer reference {number} names no {kind}: {reference!r}")
    given = parse_answer(kind, hypothesis, cells)
    right.setdefault(kind, []).append(given == expected)
    well_formed.append(given is not None)
  by_kind = {kind: sum(hits) / len(hits) for kind, hits in sorted(right.items())}
  return by_kind, sum(well_formed) / max(len(well_formed), 1)


def _words(output) -> str:
  return " ".join(output.words or [])


def task_metrics(task: str, outputs: Sequence, references: Sequence, *, cells: int | None = None,
                 kinds: Sequence[str | None] | None = None,
                 scenes: Sequence | None = None) -> dict[str, float]:
  """Metrics of one task's outputs (`omnijax.generate.run.Output`) against the references
  (the same post-processing applied to the held-out responses). `cells`: the toy world's grid
  of cells, when the data is the toy world (captions and answers are then read with its
  grammar); `kinds`: each sample's question kind (vqa, svqa; `question_kinds`); `scenes`: the
  scene each question is about (vqa, svqa; `question_scenes`), for `binding_scores`."""
  if task in IMAGE_TASKS:
    if any(o.scene is None for o in list(outputs) + list(references)):
      raise ValueError(f"{task}: scene metrics need the toy world's image parser")
    scores = scene_scores([o.scene for o in outputs], [r.scene for r in references])
    return {**scores, "quality": scores["exact_scene"]}
  if task == "caption":
    error = wer([r.text for r in references], [o.text for o in outputs])
    if cells is None:
      return {"wer": error, "quality": 1.0 - error}
    generated, expected = caption_scenes(outputs, references, cells)
    scores = scene_scores(generated, expected)
    well_formed = sum(scene is not None for scene in generated) / len(generated)
    return {**scores, "well_formed": well_formed, "wer": error, "quality": scores["exact_scene"]}
  if task == "asr":
    error = wer([r.text for r in references], [o.text for o in outputs])
    heard = transcript_scenes([o.text for o in outputs], [r.text for r in references], cells)
    return {**heard, "wer": error, "quality": 1.0 - error}
  if task == "vqa":
    accuracy = exact_match([r.text for r in references], [o.text for o in outputs])
    by_kind = _by_kind(references, outputs, kinds, cells, "", scenes)
    return {"accuracy": accuracy, **by_kind, "quality": accuracy}
  if task == "tts":
    error = wer([_words(r) for r in references], [_words(o) for o in outputs])
    spoken = transcript_scenes([_words(o) for o in outputs], [_words(r) for r in references],
                               cells)
    return {**spoken, "wer": error, "quality": 1.0 - error}
  if task == "svqa":
    accuracy = exact_match([r.text for r in references], [o.text for o in outputs])
    spoken = exact_match([_words(r) for r in references], [_words(o) for o in outputs])
    error = wer([_words(r) for r in references], [_words(o) for o in outputs])
    by_kind = _by_kind(references, outputs, kinds, cells, "text_", scenes)
    return {"text_accuracy": accuracy, **by_kind, "speech_accuracy": spoken, "speech_wer": error,
            "quality": min(accuracy, 1.0 - error)}
  raise ValueError(f"no metric for task {task!r}")


def _by_kind(references, outputs, kinds, cells, prefix: str, scenes) -> dict[str, float]:
  """{prefix}accuracy_{kind} and {prefix}well_formed, on the toy world; with the questions'
  scenes also `binding_scores`' figures under the same prefix."""
  if cells is None or kinds is None or all(kind is None for kind in kinds):
    return {}
  answers, hypotheses = [r.text for r in references], [o.text for o in outputs]
  by_kind, well_formed = answer_scores(answers, hypotheses, kinds, cells)
  binding = {} if scenes is None else binding_scores(answers, hypotheses, kinds, scenes, cells)
  return {**{f"{prefix}accuracy_{kind}": value for kind, value in by_kind.items()},
          f"{prefix}well_formed": well_formed,
          **{f"{prefix}{name}": value for name, value in binding.items()}}


_ATTRIBUTE = {"position": lambda thing, names: names[thing.cell],
              "colour": lambda thing, names: thing.colour,
              "shape": lambda thing, names: thing.shape}


def binding_scores(references: Sequence[str], hypotheses: Sequence[str],
                   kinds: Sequence[str | None], scenes: Sequence, cells: int) -> dict[str, float]:
  """Whether answers come from the object the question names (toy world; samples whose
  question has no kind are left out).

  object_chance (and object_chance_{kind}): the exact match expected of a model that sees every
  object of the scene but answers about one drawn at random, the question's object ignored: a
  count question right, a position, colour or shape question right as often as a drawn object
  has the answer's value. A model at this figure perceives the scene but has not learned which
  object a question asks about; the constant-answer chance (`omnijax.eval.chance`) misses that.
  names_scene_value: of the position, colour and shape answers, the fraction naming a value some
  object of the scene has (right or wrong)."""
  names = cell_names(cells)
  chances: dict[str, list[float]] = {}
  in_scene = []
  for number, (reference, hypothesis, kind, scene) in enumerate(
      zip(references, hypotheses, kinds, scenes)):
    if kind is None:
      continue
    if kind == "count":
      chances.setdefault(kind, []).append(1.0)
      continue
    values = [_ATTRIBUTE[kind](thing, names) for thing in scene.things]
    expected = parse_answer(kind, reference, cells)
    if expected not in values:
      raise ValueError(f"answer reference {number} ({reference!r}) is no {kind} of its scene's "
                       f"objects ({scene.key})")
    chances.setdefault(kind, []).append(values.count(expected) / len(values))
    in_scene.append(parse_answer(kind, hypothesis, cells) in values)
  every = [chance for values in chances.values() for chance in values]
  return {"object_chance": sum(every) / max(len(every), 1),
          **{f"object_chance_{kind}": sum(v) / len(v) for kind, v in sorted(chances.items())},
          "names_scene_value": sum(in_scene) / max(len(in_scene), 1)}


def sample_scores(task: str, outputs: Sequence, references: Sequence, *,
                  cells: int | None = None) -> list[float | None]:
  """Each sample's own headline score, for auditing (`samples.jsonl`): 1 or 0 where the
  headline is an accuracy, else 1 - the sample's own WER (None for a reference without words;
  svqa: the lower of its text match and 1 - its speech WER). The corpus figures are not their
  mean where WER is involved: corpus WER weighs samples by their reference's words."""
  if task in IMAGE_TASKS:
    return [float(o.scene == r.scene) for o, r in zip(outputs, references)]
  if task == "caption" and cells is not None:
    generated, expected = caption_scenes(outputs, references, cells)
    return [float(g is not None and g == e) for g, e in zip(generated, expected)]
  if task in ("caption", "asr"):
    return [_one_minus_wer(r.text, o.text) for o, r in zip(outputs, references)]
  if task == "vqa":
    return [float(_same(r.text, o.text)) for o, r in zip(outputs, references)]
  if task == "tts":
    return [_one_minus_wer(_words(r), _words(o)) for o, r in zip(outputs, references)]
  if task == "svqa":
    scores = []
    for o, r in zip(outputs, references):
      spoken = _one_minus_wer(_words(r), _words(o))
      scores.append(None if spoken is None else min(float(_same(r.text, o.text)), spoken))
    return scores
  raise ValueError(f"no metric for task {task!r}")


def _one_minus_wer(reference: str, hypothesis: str) -> float | None:
  return 1.0 - wer([reference], [hypothesis]) if normalize(reference) else None
