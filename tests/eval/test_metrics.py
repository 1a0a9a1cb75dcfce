"""WER and the per-task metrics, on hand-checked cases and on the toy world's ground truth."""

import pytest

from omnijax.data.toyworld.scenes import Scene, Thing
from omnijax.data.toyworld.world import ToyWorldSpec, build
from omnijax.data.templates import ChatTemplate
from omnijax.eval import wer
from omnijax.eval.metrics import exact_match, scene_scores, task_metrics
from omnijax.generate import settings
from omnijax.generate.run import Generator


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
  # Exact: neither. Objects: (1 of max(2, 1)) + (1 of max(1, 2)) = 2 / 4.
  assert scores == {"exact_scene": 0.0, "object_accuracy": 0.5}
  assert scene_scores(truth, truth) == {"exact_scene": 1.0, "object_accuracy": 1.0}
  assert exact_match(["Top Right", "two"], ["top  right", "three"]) == 0.5


def test_every_task_scores_its_own_ground_truth_as_perfect():
  spec = ToyWorldSpec(n=20, seed=0, grid=8)
  world = build(spec)
  template = ChatTemplate(world.tokenizer, spec.vocab, spec.image_lengths)
  generator = Generator(None, spec.vocab, template, settings.Lengths.toy_world(spec), spec)
  by_task = {}
  for sample in world.samples["heldout"]:
    by_task.setdefault(sample.task, []).append(generator.postprocess(sample.task, sample.response, 0))
  assert len(by_task) == 7
  for task, references in by_task.items():
    metrics = task_metrics(task, references, references)
    assert metrics["quality"] == 1.0, (task, metrics)
  # And a wrong answer costs: the first caption's text replaced.
  captions = by_task["caption"]
  wrong = [type(captions[0])("caption", captions[0].canvas, 0, text="there is nothing")] + captions[1:]
  assert task_metrics("caption", wrong, captions)["wer"] > 0
