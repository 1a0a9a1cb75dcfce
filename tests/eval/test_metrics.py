"""WER and the per-task metrics, on hand-checked cases and on the toy world's ground truth."""

import dataclasses

import pytest

from omnijax.data.toyworld.scenes import Scene, Thing
from omnijax.data.toyworld.world import ToyWorldSpec, build
from omnijax.data.templates import ChatTemplate
from omnijax.eval import wer
from omnijax.eval.evaluate import question_kinds, question_scenes
from omnijax.eval.metrics import (binding_scores, exact_match, sample_scores, scene_scores,
                                  task_metrics)
from omnijax.generate import settings
from omnijax.generate.run import Generator, Output


def test_wer_is_total_edits_over_total_reference_words():
  # 1 substitution in 3 words, 2 deletions in 2 words: 3 / 5, not the mean (1/3 + 1) / 2.
  assert wer(["a b c", "d e"], ["a x c", ""]) == pytest.approx(0.6)
  assert wer(["Hello <unk> World"], ["hello world"]) == 0.0  # case and tags do not count
  assert wer(["a b", ""], ["a b", "c d"]) == pytest.approx(1.0)  # 2 insertions / 2 words
  assert wer(["a"], ["a b c"]) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    wer(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="no words"):
    wer([""], ["a"])


def test_scene_scores_count_missing_and_invented_objects():
  red = Thing(0, "circle", "red")
  blue = Thing(1, "square", "blue")
  green = Thing(3, "cross", "green")
  truth = [Scene((red, blue)), Scene((green,))]
  generated = [Scene((red,)), Scene((Thing(0, "circle", "red"), green))]
  scores = scene_scores(generated, truth)
  # Exact: neither. Objects: (1 of max(2, 1)) + (1 of max(1, 2)) = 2 / 4; F1: 2 x 2 right over
  # 3 generated + 3 reference objects.
  assert scores == {"exact_scene": 0.0, "object_f1": pytest.approx(4 / 6), "object_accuracy": 0.5}
  assert scene_scores(truth, truth) == {"exact_scene": 1.0, "object_f1": 1.0,
                                        "object_accuracy": 1.0}
  # A text that is no caption is no scene: wrong, and none of its objects right.
  assert scene_scores([None, truth[1]], truth) == {"exact_scene": 0.5, "object_f1": 2 / 4,
                                                   "object_accuracy": 1 / 3}
  assert exact_match(["Top Right", "two"], ["top  right", "three"]) == 0.5


@pytest.fixture(scope="module")
def world():
  """(generator, {task: held-out samples}, {task: their references}, {task: question kinds}) of
  a small toy world."""
  spec = ToyWorldSpec(n=300, seed=0, grid=8)
  world = build(spec)
  template = ChatTemplate(world.tokenizer, spec.vocab, spec.image_lengths)
  generator = Generator(None, spec.vocab, template, settings.DecodeConstants.toy_world(spec), spec)
  samples, references = {}, {}
  for sample in world.samples["heldout"]:
    samples.setdefault(sample.task, []).append(sample)
    references.setdefault(sample.task, []).append(
        generator.postprocess(sample.task, sample.response, 0))
  kinds = {task: question_kinds(generator, task, samples[task]) for task in samples}
  return generator, samples, references, kinds


@pytest.fixture(scope="module")
def world_outputs(world):
  """(generator, {task: held-out references}, {task: question kinds})."""
  generator, _, references, kinds = world
  return generator, references, kinds


def test_every_task_scores_its_own_ground_truth_as_perfect(world_outputs):
  _, by_task, kinds = world_outputs
  assert len(by_task) == 7
  for task, references in by_task.items():
    metrics = task_metrics(task, references, references, cells=2, kinds=kinds[task])
    assert metrics["quality"] == 1.0, (task, metrics)
    assert all(value == 1.0 for name, value in metrics.items() if "accuracy" in name
               or name in ("exact_scene", "object_f1", "well_formed")), (task, metrics)
    assert sample_scores(task, references, references, cells=2) == [1.0] * len(references)
  # And a wrong answer costs: the first caption's text replaced.
  captions = by_task["caption"]
  wrong = [type(captions[0])("caption", captions[0].canvas, 0, text="there is nothing")] + captions[1:]
  assert task_metrics("caption", wrong, captions)["wer"] > 0


def _with_text(output: Output, text: str) -> Output:
  return dataclasses.replace(output, text=text)


def test_a_caption_scores_what_it_means_not_its_words(world_outputs):
  """The same objects in another order are exact (though WER counts them wrong); one wrong
  colour is not (though WER barely notices); text outside the grammar scores 0, never raises."""
  _, by_task, _ = world_outputs
  references = by_task["caption"][:3]
  references = [_with_text(r, text) for r, text in zip(references, (
      "there is a red circle at the top left and a blue cross at the bottom right",
      "there is a green square at the top right",
      "there is a yellow triangle at the top left and a red circle at the bottom left"))]
  outputs = [_with_text(references[0], "there is a blue cross at the bottom right and a red "
                        "circle at the top left"),
             _with_text(references[1], "there is a green square at the top right and a"),
             _with_text(references[2], "there is a yellow triangle at the top left and a red "
                        "circle at the bottom right")]
  metrics = task_metrics("caption", outputs, references, cells=2)
  assert metrics["exact_scene"] == metrics["quality"] == pytest.approx(1 / 3)
  assert metrics["well_formed"] == pytest.approx(2 / 3)
  # Objects right: 2 + 0 (malformed) + 1, of 2 + 0 + 2 generated and 2 + 1 + 2 reference ones.
  assert metrics["object_f1"] == pytest.approx(2 * 3 / (4 + 5))
  assert metrics["object_accuracy"] == pytest.approx(3 / (2 + 1 + 2))
  # WER: the exact reordered caption costs 8 of its 17 words, the wrong one 1 of 17.
  assert wer([references[0].text], [outputs[0].text]) == pytest.approx(8 / 17)
  assert wer([references[2].text], [outputs[2].text]) == pytest.approx(1 / 17)
  assert sample_scores("caption", outputs, references, cells=2) == [1.0, 0.0, 0.0]
  # Off the toy world (no grammar to read it with) the headline stays 1 - WER.
  plain = task_metrics("caption", outputs, references)
  assert set(plain) == {"wer", "quality"} and plain["quality"] == 1 - metrics["wer"]
  with pytest.raises(ValueError, match="caption reference 0 is no caption of the toy world's "
                                       "grammar: 'a cat'"):
    task_metrics("caption", outputs[:1], [_with_text(references[0], "a cat")], cells=2)


def test_transcripts_are_also_read_back_as_scenes(world_outputs):
  """ASR text and TTS's spoken words with the template right and the colours wrong score well
  on WER, and their scene figures show that the content was not heard."""
  _, by_task, _ = world_outputs
  for task in ("asr", "tts"):
    references = by_task[task][:2]
    spoken = [" ".join(r.words) if task == "tts" else r.text for r in references]
    wrong = [text.replace("red", "cyan").replace("blue", "red").replace("cyan", "blue")
             .replace("green", "yellow") for text in spoken]
    assert wrong != spoken
    outputs = [dataclasses.replace(r, words=text.split(), text="") if task == "tts" else
               _with_text(r, text) for r, text in zip(references, wrong)]
    changed = [a != b for a, b in zip(wrong, spoken)]
    metrics = task_metrics(task, outputs, references, cells=2)
    assert metrics["quality"] > 0.75 and metrics["well_formed"] == 1.0
    assert metrics["exact_scene"] == pytest.approx(1 - sum(changed) / 2)
    assert metrics["object_f1"] < 1.0
    assert set(task_metrics(task, outputs, references)) == {"wer", "quality"}  # no grammar


def test_answers_are_scored_per_question_kind(world_outputs):
  _, by_task, kinds = world_outputs
  references, asked = by_task["vqa"], kinds["vqa"]
  assert set(asked) == {"count", "position", "colour", "shape"}
  # Every count question answered wrongly with a number, every other one with a shape.
  outputs = [_with_text(r, ("zero" if kind == "count" else "triangle")) for r, kind in
             zip(references, asked)]
  metrics = task_metrics("vqa", outputs, references, cells=2, kinds=asked)
  right_shapes = sum(kind == "shape" and r.text == "triangle" for r, kind in zip(references, asked))
  shape_questions = asked.count("shape")
  assert metrics["accuracy_count"] == 0.0
  assert metrics["accuracy_shape"] == pytest.approx(right_shapes / shape_questions)
  assert metrics["accuracy"] == pytest.approx(right_shapes / len(asked))
  # Well formed: the count answers (a number) and the shape answers, not the others.
  assert metrics["well_formed"] == pytest.approx(
      (asked.count("count") + shape_questions) / len(asked))
  assert metrics["accuracy_position"] == metrics["accuracy_colour"] == 0.0


def test_spoken_answers_score_text_per_kind_and_speech_exactly(world_outputs):
  _, by_task, kinds = world_outputs
  references, asked = by_task["svqa"], kinds["svqa"]
  assert None not in asked
  # The text right everywhere; the speech says one word too many on the first answer.
  outputs = [dataclasses.replace(references[0], words=references[0].words + ["red"])] + \
      list(references[1:])
  metrics = task_metrics("svqa", outputs, references, cells=2, kinds=asked)
  assert metrics["text_accuracy"] == metrics["text_well_formed"] == 1.0
  assert all(metrics[f"text_accuracy_{kind}"] == 1.0 for kind in set(asked))
  assert metrics["speech_accuracy"] == pytest.approx(1 - 1 / len(references))
  words = sum(len(r.words) for r in references)
  assert metrics["speech_wer"] == pytest.approx(1 / words)
  assert metrics["quality"] == pytest.approx(1 - 1 / words)
  scores = sample_scores("svqa", outputs, references, cells=2)
  assert scores[0] == pytest.approx(1 - 1 / len(references[0].words)) and scores[1:] == \
      [1.0] * (len(references) - 1)


def test_binding_separates_seeing_the_objects_from_finding_the_one_asked_about():
  two = Scene((Thing(0, "circle", "red"), Thing(1, "square", "blue")))
  three = Scene((Thing(0, "circle", "red"), Thing(1, "square", "red"), Thing(3, "cross", "green")))
  references = ["red", "bottom right", "cross", "three", "two"]
  kinds = ["colour", "position", "shape", "count", None]
  scenes = [two, three, three, three, three]
  # The circle's colour answered with the square's (in the scene, wrong), the cross's place with
  # an empty cell (not in the scene), the green object's shape right, the count wrong.
  hypotheses = ["blue", "bottom left", "cross", "two", "zero"]
  scores = binding_scores(references, hypotheses, kinds, scenes, cells=2)
  # Drawing an object at random: the circle's colour 1 of 2, the cross's place and shape 1 of 3,
  # a count always right; the question without a kind is left out.
  assert scores == pytest.approx({
      "object_chance": (1 / 2 + 1 / 3 + 1 / 3 + 1) / 4, "object_chance_colour": 1 / 2,
      "object_chance_count": 1.0, "object_chance_position": 1 / 3, "object_chance_shape": 1 / 3,
      "names_scene_value": 2 / 3})
  # "what color is the square?" beside a red circle: drawing either object is right; beside a red
  # circle and a green cross, 2 of 3.
  both_red = Scene((Thing(0, "circle", "red"), Thing(1, "square", "red")))
  assert binding_scores(["red"], ["red"], ["colour"], [both_red], cells=2)["object_chance"] == 1.0
  assert binding_scores(["red"], ["red"], ["colour"], [three], cells=2)["object_chance"] == \
      pytest.approx(2 / 3)
  with pytest.raises(ValueError, match=r"answer reference 0 \('blue'\) is no colour of its scene"):
    binding_scores(["blue"], ["blue"], ["colour"], [three], cells=2)


def test_binding_figures_on_the_worlds_own_questions(world):
  generator, samples, references, kinds = world
  for task, prefix in (("vqa", ""), ("svqa", "text_")):
    scenes = question_scenes(generator, task, samples[task])
    # The prompt's image read back is the scene the question was drawn from: every answer is a
    # value of one of its objects, so the ground truth names scene values only.
    metrics = task_metrics(task, references[task], references[task], cells=2, kinds=kinds[task],
                           scenes=scenes)
    assert metrics[f"{prefix}names_scene_value"] == 1.0
    # Chance is below the truth's 1.0 (multi-object scenes) and a count question always counts.
    assert 1 / 3 <= metrics[f"{prefix}object_chance"] < 1.0
    assert metrics[f"{prefix}object_chance_count"] == 1.0
    # Without scenes, no binding figures.
    plain = task_metrics(task, references[task], references[task], cells=2, kinds=kinds[task])
    assert not any("object_chance" in name or "scene_value" in name for name in plain)
  assert question_scenes(generator, "caption", samples["caption"]) is None
