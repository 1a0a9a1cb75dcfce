"""The toy world's samples: scenes -> conversations in every task -> BPE -> templated samples.

Everything is a function of `ToyWorldSpec`, the seed included: the same spec gives the same
scenes, tokenizer and token ids, byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tokenizers

from omnijax.data import tasks
from omnijax.data.record import Sample
from omnijax.data.requests import request_messages
from omnijax.data.templates import AUDIO, IMAGE, ChatTemplate, ImageLengths
from omnijax.data.toyworld import scenes as scenes_lib
from omnijax.data.toyworld.images import ImageCodebook
from omnijax.data.toyworld.scenes import Scene
from omnijax.data.toyworld.speech import SpeechCodebook
from omnijax.data.toyworld.tokenizer import train_bpe
from omnijax.vocab import Vocab

SPLITS = ("train", "heldout")
_MAX_DRAWS_PER_SCENE = 50


@dataclasses.dataclass(frozen=True)
class ToyWorldSpec:
  n: int  # distinct scenes over both splits; every scene yields one sample of every task
  seed: int = 0
  text_size: int = 512
  n_image_codes: int = 256
  n_speech_codes: int = 256
  grid: int = 16
  cells: int = 2
  background_codes: int = 4
  heldout_fraction: float = 0.1

  def __post_init__(self):
    if self.n < 2:
      raise ValueError(f"n={self.n}: the toy world needs at least 2 scenes (one per split)")
    if not 0 < self.heldout_fraction < 1:
      raise ValueError(f"heldout_fraction={self.heldout_fraction} must lie in (0, 1)")
    if self.images.codes_used > self.n_image_codes:
      raise ValueError(f"the image codebook needs {self.images.codes_used} codes, the vocabulary "
                       f"has n_image_codes={self.n_image_codes}")
    self.speech  # validates that the lexicon fits the speech codes

  @property
  def vocab(self) -> Vocab:
    return Vocab.compact(self.text_size, n_image_codes=self.n_image_codes,
                         n_speech_codes=self.n_speech_codes)

  @property
  def images(self) -> ImageCodebook:
    return ImageCodebook(self.grid, self.cells, self.background_codes)

  @functools.cached_property
  def speech(self) -> SpeechCodebook:
    return SpeechCodebook(scenes_lib.lexicon(self.cells), self.n_speech_codes)

  @property
  def image_lengths(self) -> ImageLengths:
    return ImageLengths(understanding=self.images.codes_per_image,
                        generated=self.images.codes_per_image)


def split_scenes(spec: ToyWorldSpec) -> dict[str, list[Scene]]:
  """`spec.n` distinct scenes, the first `heldout_fraction` of them held out: no scene in both."""
  rng = np.random.default_rng([spec.seed, 0])
  drawn: dict[str, Scene] = {}
  for _ in range(_MAX_DRAWS_PER_SCENE * spec.n):
    scene = scenes_lib.random_scene(rng, spec.cells)
    drawn.setdefault(scene.key, scene)
    if len(drawn) == spec.n:
      break
  else:
    raise ValueError(f"could not draw {spec.n} distinct scenes on a {spec.cells}x{spec.cells} grid")
  ordered = list(drawn.values())
  heldout = max(1, round(spec.n * spec.heldout_fraction))
  return {"heldout": ordered[:heldout], "train": ordered[heldout:]}


def conversations(scene: Scene, spec: ToyWorldSpec, rng: np.random.Generator) -> list[tuple]:
  """One (task, messages, image_codes, speech_codes) per task, in `TASKS` order."""
  def say(text):
    return spec.speech.encode(scenes_lib.spoken_words(text), int(rng.integers(spec.speech.speakers)), rng)

  def ask(task, text=None, answer=IMAGE):
    return [*request_messages(task, text), {"role": "assistant", "content": answer}]

  description = scenes_lib.caption(scene)
  question, answer = scenes_lib.question_answer(scene, rng)
  caption_prompt = scenes_lib.CAPTION_PROMPTS[rng.integers(len(scenes_lib.CAPTION_PROMPTS))]
  image = lambda: spec.images.encode(scene, rng)  # noqa: E731 - a fresh background per use
  by_task = {
      "t2i": (ask("t2i", description), [image()], []),
      "caption": (ask("caption", caption_prompt, description), [image()], []),
      "vqa": (ask("vqa", question, answer), [image()], []),
      "asr": (ask("asr", answer=" ".join(scenes_lib.spoken_words(description))), [],
              [say(description)]),
      "tts": (ask("tts", description, AUDIO), [], [say(description)]),
      "s2i": (ask("s2i"), [image()], [say(description)]),
      "svqa": (ask("svqa", answer=f"{answer}\n{AUDIO}"), [image()], [say(question), say(answer)]),
  }
  return [(task, *by_task[task]) for task in tasks.TASKS]


@dataclasses.dataclass
class ToyWorld:
  spec: ToyWorldSpec
  tokenizer: tokenizers.Tokenizer
  scenes: dict[str, list[Scene]]
  samples: dict[str, list[Sample]]


def build(spec: ToyWorldSpec) -> ToyWorld:
  scenes = split_scenes(spec)
  raw = {split: [conversation
                 for number, scene in enumerate(scenes[split])
                 for conversation in conversations(
                     scene, spec, np.random.default_rng([spec.seed, 1, SPLITS.index(split), number]))]
         for split in SPLITS}
  # The BPE sees every text the templates tokenize, so the toy text never falls back to bytes.
  corpus = [message["content"].replace(IMAGE, "").replace(AUDIO, "")
            for split in SPLITS for _, messages, _, _ in raw[split] for message in messages]
  corpus += ["system", "user", "assistant", "\n"]  # the turn headers
  tokenizer = train_bpe(corpus, spec.vocab)
  template = ChatTemplate(tokenizer, spec.vocab, spec.image_lengths)
  samples = {split: [template.encode(*conversation) for conversation in raw[split]]
             for split in SPLITS}
  return ToyWorld(spec, tokenizer, scenes, samples)
