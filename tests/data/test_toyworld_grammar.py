"""The toy world's English read back: captions to scenes, questions to kinds, answers to values."""

import itertools

import numpy as np
import pytest

from omnijax.data.toyworld import scenes as scenes_lib
from omnijax.data.toyworld.scenes import (COLOURS, MAX_OBJECTS, SHAPES, Scene, Thing,
                                          parse_answer, parse_caption, parse_question)


def every_scene(cells: int):
  """Every scene the world can draw on a cells x cells grid: 1-3 objects in distinct cells."""
  kinds = list(itertools.product(SHAPES, COLOURS))
  for count in range(1, MAX_OBJECTS + 1):
    for places in itertools.combinations(range(cells * cells), count):
      for chosen in itertools.product(kinds, repeat=count):
        yield Scene(tuple(Thing(cell, shape, colour)
                          for cell, (shape, colour) in zip(places, chosen)), cells)


def test_every_caption_of_the_2x2_world_parses_back_to_its_scene():
  scenes = list(every_scene(2))
  assert len(scenes) == 17_984  # the count of possible scenes
  for scene in scenes:
    assert parse_caption(scenes_lib.caption(scene), 2) == scene


def test_captions_of_the_3x3_world_parse_back_including_one_word_places():
  rng = np.random.default_rng(0)
  for _ in range(3000):
    scene = scenes_lib.random_scene(rng, 3)
    assert parse_caption(scenes_lib.caption(scene), 3) == scene
  # "top" is a place of its own on a 3x3 grid and the start of "top left": no confusion.
  assert parse_caption("there is a red circle at the top and a blue cross at the top left", 3) \
      == Scene((Thing(0, "cross", "blue"), Thing(1, "circle", "red")), 3)


def test_a_caption_means_its_objects_whatever_their_order_case_or_spacing():
  scene = Scene((Thing(0, "circle", "red"), Thing(3, "cross", "green")))
  assert parse_caption("There is a green cross at the bottom right  and a red circle at the "
                       "top left", 2) == scene


@pytest.mark.parametrize("text", [
    "",
    "there is",
    "there is a",
    "there is a red circle",
    "there is a red circle at the",
    "there is a red circle at the top left and",
    "there is a red circle at the top left and a",
    "there is a red circle at the middle",  # no such place on a 2x2 grid
    "there is a red circle at the top",  # a 3x3 place only
    "there is a purple circle at the top left",
    "there is a red hexagon at the top left",
    "there is a red circle at the top left.",  # punctuation is not forgiven
    "there is a circle red at the top left",
    "there is one red circle at the top left",
    "there are a red circle at the top left",
    "there is a red circle in the top left",
    "there is a red circle at the top left and a blue cross at the top left",  # one cell, two objects
    "there is a red circle at the top left and and a blue cross at the top right",
    "a red circle at the top left",
    "<|mask|> <|endoftext|>",
    "there is a red circle at the top left a blue cross at the top right",
])
def test_malformed_captions_parse_to_nothing(text):
  assert parse_caption(text, 2) is None


def test_random_word_salad_never_raises_and_only_grammatical_text_parses():
  rng = np.random.default_rng(1)
  lexicon = list(scenes_lib.lexicon(2)) + ["", "?", "<unk>", "ÿ"]
  parsed = 0
  for _ in range(5000):
    words = [str(word) for word in rng.choice(lexicon, size=rng.integers(0, 25))]
    if rng.random() < 0.5:
      words = ["there", "is", *words]
    scene = parse_caption(" ".join(words), 2)
    if scene is not None:  # then it must be exactly the caption of that scene, up to order
      parsed += 1
      assert sorted(" ".join(words).split(" and ")) == sorted(scenes_lib.caption(scene).split(" and "))
  assert parsed < 5000


def test_every_question_parses_to_its_kind_and_every_answer_to_its_value():
  kinds_seen = set()
  for cells in (2, 3):
    rng = np.random.default_rng(cells)
    for _ in range(2000):
      for kind, question, answer in scenes_lib.question_options(scenes_lib.random_scene(rng, cells)):
        assert parse_question(question) == kind, question
        assert parse_answer(kind, answer, cells) == answer
        # The spoken question (svqa) has no punctuation: the same kind.
        assert parse_question(" ".join(scenes_lib.spoken_words(question))) == kind
        kinds_seen.add(kind)
  assert kinds_seen == set(scenes_lib.QUESTION_KINDS)


def test_question_answer_draws_one_of_the_options_as_before():
  """The refactor into `question_options` keeps the world's draws: the same rng gives the same
  question as the former inline code (options in the same order, one integer drawn)."""
  scene = Scene((Thing(0, "circle", "red"), Thing(1, "circle", "blue"), Thing(2, "cross", "red")))
  options = scenes_lib.question_options(scene)
  # Two circles and two red things: no colour question about a circle, no shape question about
  # a red object.
  assert options == [("count", "how many objects are there?", "three"),
                     ("position", "where is the red circle?", "top left"),
                     ("position", "where is the blue circle?", "top right"),
                     ("shape", "what shape is the blue object?", "circle"),
                     ("position", "where is the red cross?", "bottom left"),
                     ("colour", "what color is the cross?", "red")]
  for seed in range(20):
    drawn = np.random.default_rng(seed).integers(len(options))
    assert scenes_lib.question_answer(scene, np.random.default_rng(seed)) == options[drawn][1:]


@pytest.mark.parametrize("kind, text, value", [
    ("count", "Two", "two"),
    ("count", "2", None),
    ("count", "red", None),
    ("position", "top  right", "top right"),
    ("position", "top", None),  # a 3x3 place on a 2x2 grid
    ("position", "top right corner", None),
    ("colour", "green", "green"),
    ("colour", "circle", None),  # an answer of another kind
    ("shape", "", None),
    ("shape", "the cross", None),
])
def test_answers_name_a_value_of_the_kind_asked_or_nothing(kind, text, value):
  assert parse_answer(kind, text, 2) == value


def test_questions_outside_the_grammar_have_no_kind():
  for text in ("", "how many objects?", "where is the red?", "what color is the red circle?",
               "what shape is the red thing?", "what size is the red object?", "user",
               "where is the purple circle?"):
    assert parse_question(text) is None, text
  with pytest.raises(ValueError, match="unknown question kind 'size'"):
    parse_answer("size", "big", 2)
