"""The toy world's samples: scenes -> conversations in every task -> BPE -> templated samples.

Everything is a function of `ToyWorldSpec`, the seed included: the same spec gives the same
scenes, tokenizer and token ids, byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tokenizers

from omnijax.config import SPEECH_INPUT_KINDS, SpeechEncoderConfig
from omnijax.data import tasks
from omnijax.data.record import FieldSpec, Sample
from omnijax.data.requests import request_messages
from omnijax.data.speech_frontend import Cmvn, stacked_fbank
from omnijax.data.templates import AUDIO, IMAGE, ChatTemplate, ImageLengths, speech_field_specs
from omnijax.data.toyworld import scenes as scenes_lib
from omnijax.data.toyworld.images import ImageCodebook
from omnijax.data.toyworld.scenes import Scene
from omnijax.data.toyworld.speech import SpeechCodebook
from omnijax.data.toyworld.tokenizer import train_bpe
from omnijax.vocab import Vocab

# train: what training reads; validation: scenes held back for recipe choices; heldout: the
# reported figures, never tuned on. No scene is in two splits.
SPLITS = ("train", "validation", "heldout")
_MAX_DRAWS_PER_SCENE = 50
ASSISTANT_SPEAKER = 0


@dataclasses.dataclass(frozen=True)
class ToyWorldSpec:
  n: int  # distinct scenes over all splits; every scene yields one sample of every task
  seed: int = 0
  text_size: int = 512
  n_image_codes: int = 256
  n_speech_codes: int = 256
  grid: int = 16
  cells: int = 2
  background_codes: int = 4
  heldout_fraction: float = 0.1
  validation_fraction: float = 0.05
  # discrete: the user's speech as codes; continuous: as waveforms rendered from those codes,
  # stored as the speech encoder's features with `mel_bins` fbank bins (the rest of the front
  # end the release's).
  speech_input: str = "discrete"
  mel_bins: int = 40

  def __post_init__(self):
    if self.speech_input not in SPEECH_INPUT_KINDS:
      raise ValueError(f"speech_input={self.speech_input!r}: expected one of {SPEECH_INPUT_KINDS}")
    if self.seed < 0:  # numpy's seed sequences take non-negative integers
      raise ValueError(f"seed={self.seed}: expected an integer >= 0")
    if self.n < len(SPLITS):
      raise ValueError(f"n={self.n}: the toy world needs at least {len(SPLITS)} scenes (one per "
                       "split)")
    for name in ("heldout_fraction", "validation_fraction"):
      if not 0 < getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must lie in (0, 1)")
    if self.split_sizes["train"] < 1:
      raise ValueError(f"n={self.n} with heldout_fraction={self.heldout_fraction} and "
                       f"validation_fraction={self.validation_fraction} leaves no training scene "
                       f"(every split needs one)")
    if self.images.codes_used > self.n_image_codes:
      raise ValueError(f"the image codebook needs {self.images.codes_used} codes, the vocabulary "
                       f"has n_image_codes={self.n_image_codes}")
    self.speech  # validates that the lexicon fits the speech codes

  @property
  def split_sizes(self) -> dict[str, int]:
    """Scenes per split: at least one held out and one for validation, the rest train."""
    heldout = max(1, round(self.n * self.heldout_fraction))
    validation = max(1, round(self.n * self.validation_fraction))
    return {"train": self.n - heldout - validation, "validation": validation, "heldout": heldout}

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
  def frontend(self) -> SpeechEncoderConfig:
    """The speech front end of continuous input (its encoder sizes are the model's business)."""
    return SpeechEncoderConfig(num_mel_bins=self.mel_bins)

  @property
  def fields(self) -> dict[str, FieldSpec]:
    """The typed fields the samples carry: the user's speech clips when continuous."""
    if self.speech_input == "discrete":
      return {}
    return speech_field_specs(self.frontend.feature_size)

  @property
  def image_lengths(self) -> ImageLengths:
    return ImageLengths(understanding=self.images.codes_per_image,
                        generated=self.images.codes_per_image)


def split_scenes(spec: ToyWorldSpec) -> dict[str, list[Scene]]:
  """`spec.n` distinct scenes dealt to `SPLITS` (sizes: `spec.split_sizes`) so that every split
  has the same mix of object counts, each split's scenes in a uniformly random order.

  Drawing distinct scenes uses up the few one-object scenes (64 on a 2x2 grid) early, so the
  first scenes drawn are not a fair sample: holding those out gave 19 % one-object scenes in
  the held-out split against 1.4 % in training. Instead the scenes are shuffled, and each
  object count's scenes are dealt to held-out and validation in proportion to the count's share
  (largest remainders), the rest to train. Any prefix of a split (`omnijax eval --limit`) is
  then a fair sample of it too."""
  rng = np.random.default_rng([spec.seed, 0])
  drawn: dict[str, Scene] = {}
  for _ in range(_MAX_DRAWS_PER_SCENE * spec.n):
    scene = scenes_lib.random_scene(rng, spec.cells)
    drawn.setdefault(scene.key, scene)
    if len(drawn) == spec.n:
      break
  else:
    raise ValueError(f"could not draw {spec.n} distinct scenes on a {spec.cells}x{spec.cells} grid")
  shuffled = [list(drawn.values())[i]
              for i in np.random.default_rng([spec.seed, 2]).permutation(spec.n)]
  by_count: dict[int, list[Scene]] = {}
  for scene in shuffled:
    by_count.setdefault(len(scene.things), []).append(scene)
  groups = [by_count[count] for count in sorted(by_count)]
  sizes = spec.split_sizes
  heldout = _apportion(sizes["heldout"], [len(group) for group in groups])
  validation = _apportion(sizes["validation"],
                          [len(group) - taken for group, taken in zip(groups, heldout)])
  split_of: dict[str, str] = {}
  for group, held, validating in zip(groups, heldout, validation):
    for position, scene in enumerate(group):
      split_of[scene.key] = ("heldout" if position < held else
                             "validation" if position < held + validating else "train")
  splits: dict[str, list[Scene]] = {split: [] for split in SPLITS}
  for scene in shuffled:
    splits[split_of[scene.key]].append(scene)
  return splits


def _apportion(total: int, sizes: list[int]) -> list[int]:
  """`total` items shared among groups in proportion to `sizes`, by largest remainders: each
  group gets the floor of its exact share, the leftovers go to the largest fractional parts
  (ties: the earlier group). No group gets more than its size."""
  whole = sum(sizes)
  shares = [total * size // whole for size in sizes]
  remainders = [total * size % whole for size in sizes]
  for group in sorted(range(len(sizes)), key=lambda g: -remainders[g])[:total - sum(shares)]:
    shares[group] += 1
  return shares


def conversations(scene: Scene, spec: ToyWorldSpec, rng: np.random.Generator) -> list[tuple]:
  """One (task, messages, image_codes, speech_codes) per task, in `TASKS` order."""
  def say(text):  # a user: any of the world's speakers, at an uneven pace
    return spec.speech.encode(scenes_lib.spoken_words(text), int(rng.integers(spec.speech.speakers)),
                              rng)

  def answer_aloud(text):
    # The assistant speaks in one steady voice, as the release's does (GLM-4-Voice codes voiced
    # by one speaker): its speech is a function of the text alone.
    return spec.speech.encode(scenes_lib.spoken_words(text), ASSISTANT_SPEAKER, None)

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
      "tts": (ask("tts", description, AUDIO), [], [answer_aloud(description)]),
      "s2i": (ask("s2i"), [image()], [say(description)]),
      "svqa": (ask("svqa", answer=f"{answer}\n{AUDIO}"), [image()],
               [say(question), answer_aloud(answer)]),
  }
  return [(task, *by_task[task]) for task in tasks.TASKS]


@dataclasses.dataclass
class ToyWorld:
  spec: ToyWorldSpec
  tokenizer: tokenizers.Tokenizer
  scenes: dict[str, list[Scene]]
  samples: dict[str, list[Sample]]
  cmvn: Cmvn | None = None  # continuous speech: fitted on the training split's clips


def user_speech_count(messages: list[dict]) -> int:
  """The `<|audio|>` placeholders before the assistant's turn (the speech the model hears)."""
  return sum(m["content"].count(AUDIO) for m in messages if m["role"] != "assistant")


def _continuous(spec: ToyWorldSpec, raw: dict[str, list[tuple]]) -> tuple[dict, Cmvn]:
  """The conversations with the user's speech codes rendered to features (CMVN from the
  training split), each rendering seeded by its split, conversation and clip."""
  rendered = {}
  for split, conversations_ in raw.items():
    rendered[split] = []
    for number, (task, messages, images, speeches) in enumerate(conversations_):
      heard = user_speech_count(messages)
      clips = [stacked_fbank(spec.speech.render(
                   codes, np.random.default_rng([spec.seed, 3, SPLITS.index(split), number, clip]),
                   spec.frontend.sample_rate), spec.frontend)
               for clip, codes in enumerate(speeches[:heard])]
      rendered[split].append((task, messages, images, speeches[heard:], clips))
  cmvn = Cmvn.fit(np.concatenate([clip for *_, clips in rendered["train"] for clip in clips]))
  return {split: [(*conversation[:4], [cmvn.apply(clip) for clip in conversation[4]])
                  for conversation in conversations_]
          for split, conversations_ in rendered.items()}, cmvn


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
  cmvn = None
  if spec.speech_input == "continuous":
    raw, cmvn = _continuous(spec, raw)
  samples = {split: [template.encode(*conversation) for conversation in raw[split]]
             for split in SPLITS}
  return ToyWorld(spec, tokenizer, scenes, samples, cmvn)
