"""Scenes of 1-3 coloured shapes on a coarse grid, and the English that describes them."""

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


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
  """One question about colour, shape, position or count that the scene answers unambiguously."""
  names = cell_names(scene.cells)
  shapes = [t.shape for t in scene.things]
  colours = [t.colour for t in scene.things]
  kinds = [(t.colour, t.shape) for t in scene.things]
  options = [("how many objects are there?", NUMBERS[len(scene.things)])]
  for thing in scene.things:
    if kinds.count((thing.colour, thing.shape)) == 1:
      options.append((f"where is the {thing.colour} {thing.shape}?", names[thing.cell]))
    if shapes.count(thing.shape) == 1:
      options.append((f"what color is the {thing.shape}?", thing.colour))
    if colours.count(thing.colour) == 1:
      options.append((f"what shape is the {thing.colour} object?", thing.shape))
  return options[rng.integers(len(options))]


def spoken_words(text: str) -> list[str]:
  """Text as LibriSpeech-style words: lowercase, no punctuation."""
  return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def lexicon(cells: int) -> tuple[str, ...]:
  """Every word a caption, question or answer can contain, in a fixed order."""
  fixed = ("there is a at the and how many objects are where what color shape object")
  words = fixed.split() + list(SHAPES) + list(COLOURS) + list(NUMBERS)
  words += [word for name in cell_names(cells) for word in name.split()]
  return tuple(dict.fromkeys(words))
