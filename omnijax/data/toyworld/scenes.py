"""Scenes of 1-3 coloured shapes on a coarse grid, the English that describes them, and the
parsers that read that English back (captions to scenes, questions to their kind, answers to
the attribute they name), so a generated text is scored by what it means."""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
NUMBERS = ("zero", "one", "two", "three")
MAX_OBJECTS = 3
_CELL_NAMES = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
        "bottom right"),
}
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?")
# What a question asks for (see `question_options`): the answer's attribute.
QUESTION_KINDS = ("count", "position", "colour", "shape")


@dataclasses.dataclass(frozen=True, order=True)
class Thing:
  cell: int  # row-major index into the cells x cells grid; first, so things sort by place
  shape: str
  colour: str


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects in distinct cells, kept sorted by cell: equal scenes compare and hash equal."""

  things: tuple[Thing, ...]
  cells: int = 2

  def __post_init__(self):
    if tuple(sorted(self.things)) != self.things or len({t.cell for t in self.things}) != len(self.things):
      raise ValueError(f"scene things must be sorted by cell and in distinct cells: {self.things}")

  @property
  def key(self) -> str:
    return ";".join(f"{t.cell}:{t.colour}:{t.shape}" for t in self.things)


def cell_names(cells: int) -> tuple[str, ...]:
  try:
    return _CELL_NAMES[cells]
  except KeyError:
    raise ValueError(f"the toy world supports a 2x2 or 3x3 grid of cells, got {cells}") from None


def random_scene(rng: np.random.Generator, cells: int) -> Scene:
  count = int(rng.integers(1, MAX_OBJECTS + 1))
  places = rng.choice(cells * cells, size=count, replace=False)
  things = [Thing(int(cell), SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))])
            for cell in places]
  return Scene(tuple(sorted(things)), cells)


def caption(scene: Scene) -> str:
  names = cell_names(scene.cells)
  parts = [f"a {t.colour} {t.shape} at the {names[t.cell]}" for t in scene.things]
  return "there is " + " and ".join(parts)


def question_options(scene: Scene) -> list[tuple[str, str, str]]:
  """(kind, question, answer) for every question about colour, shape, position or count that
  the scene answers unambiguously; kind is one of `QUESTION_KINDS`."""
  names = cell_names(scene.cells)
  shapes = [t.shape for t in scene.things]
  colours = [t.colour for t in scene.things]
  kinds = [(t.colour, t.shape) for t in scene.things]
  options = [("count", "how many objects are there?", NUMBERS[len(scene.things)])]
  for thing in scene.things:
    if kinds.count((thing.colour, thing.shape)) == 1:
      options.append(("position", f"where is the {thing.colour} {thing.shape}?", names[thing.cell]))
    if shapes.count(thing.shape) == 1:
      options.append(("colour", f"what color is the {thing.shape}?", thing.colour))
    if colours.count(thing.colour) == 1:
      options.append(("shape", f"what shape is the {thing.colour} object?", thing.shape))
  return options


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
  """One of `question_options`, drawn from rng: (question, answer)."""
  options = question_options(scene)
  _, question, answer = options[rng.integers(len(options))]
  return question, answer


def spoken_words(text: str) -> list[str]:
  """Text as LibriSpeech-style words: lowercase, no punctuation."""
  return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def lexicon(cells: int) -> tuple[str, ...]:
  """Every word a caption, question or answer can contain, in a fixed order."""
  fixed = ("there is a at the and how many objects are where what color shape object")
  words = fixed.split() + list(SHAPES) + list(COLOURS) + list(NUMBERS)
  words += [word for name in cell_names(cells) for word in name.split()]
  return tuple(dict.fromkeys(words))


# --- reading the English back -------------------------------------------------------------------
# Exact: a text is a sentence of the grammar above or it is malformed (None); only case and
# spacing are forgiven, as in exact match and WER. A malformed text never raises.


def parse_caption(text: str, cells: int) -> Scene | None:
  """The scene a caption describes: "there is" then "a COLOUR SHAPE at the CELL" clauses joined
  by "and", in distinct cells, in any order; None for any other text."""
  words = text.lower().split()
  if words[:2] != ["there", "is"] or len(words) == 2:
    return None
  places = {tuple(name.split()): cell for cell, name in enumerate(cell_names(cells))}
  clauses: list[list[str]] = [[]]
  for word in words[2:]:
    if word == "and":  # no colour, shape or place name contains it
      clauses.append([])
    else:
      clauses[-1].append(word)
  things = []
  for clause in clauses:
    if len(clause) < 6 or clause[0] != "a" or clause[3:5] != ["at", "the"]:
      return None
    colour, shape, cell = clause[1], clause[2], places.get(tuple(clause[5:]))
    if colour not in COLOURS or shape not in SHAPES or cell is None:
      return None
    things.append(Thing(cell, shape, colour))
  if len({thing.cell for thing in things}) != len(things):
    return None
  return Scene(tuple(sorted(things)), cells)


def parse_question(text: str) -> str | None:
  """The kind (`QUESTION_KINDS`) of a question `question_options` asks, from its text or its
  spoken words (punctuation is not spoken); None for any other text."""
  words = spoken_words(text)
  if words == ["how", "many", "objects", "are", "there"]:
    return "count"
  if len(words) == 5 and words[:3] == ["where", "is", "the"] and words[3] in COLOURS \
      and words[4] in SHAPES:
    return "position"
  if len(words) == 5 and words[:4] == ["what", "color", "is", "the"] and words[4] in SHAPES:
    return "colour"
  if len(words) == 6 and words[:4] == ["what", "shape", "is", "the"] and words[4] in COLOURS \
      and words[5] == "object":
    return "shape"
  return None


def parse_answer(kind: str, text: str, cells: int) -> str | None:
  """The attribute value an answer to a `kind` question names (a number word, a place, a colour
  or a shape), lower-cased; None when the text names no value of that kind."""
  values = {"count": NUMBERS, "position": cell_names(cells), "colour": COLOURS, "shape": SHAPES}
  if kind not in values:
    raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(QUESTION_KINDS)}")
  value = " ".join(text.lower().split())
  return value if value in values[kind] else None
