"""Words as speech-code sequences with speaker variation and duration jitter, and the decoder.

Each speaker owns a block of `units` codes. A word is an onset unit unique to it followed by one
or two body units; every unit lasts 1-3 frames. Onsets and bodies come from disjoint unit sets
and no word repeats a unit back to back, so collapsing repeats and cutting at onsets recovers the
words exactly, whoever speaks.
"""

from __future__ import annotations

import numpy as np

SPEAKERS = 4
MAX_FRAMES_PER_UNIT = 3


class SpeechCodebook:

  def __init__(self, words: tuple[str, ...], n_speech_codes: int, speakers: int = SPEAKERS):
    self.words, self.speakers = words, speakers
    self.units = n_speech_codes // speakers
    self.body_units = self.units - len(words)
    if self.body_units < 2:
      raise ValueError(f"{n_speech_codes} speech codes cannot hold {len(words)} words for "
                       f"{speakers} speakers (need more than {speakers * (len(words) + 1)})")
    # A fixed, seed-independent pronunciation per word: one model of the world across datasets.
    rng = np.random.default_rng(0)
    self._units = {}
    for onset, word in enumerate(words):
      body = rng.choice(self.body_units, size=1 + len(word) % 2, replace=False) + len(words)
      self._units[word] = (onset, *body.tolist())
    self._onset_words = dict(enumerate(words))

  def encode(self, words: list[str], speaker: int, rng: np.random.Generator) -> np.ndarray:
    """Words -> int32 speech codes of one speaker, each unit held for 1-3 frames."""
    if not 0 <= speaker < self.speakers:
      raise ValueError(f"speaker {speaker} outside [0, {self.speakers})")
    units = []
    for word in words:
      if word not in self._units:
        raise ValueError(f"the toy world has no pronunciation for {word!r}")
      units += self._units[word]
    frames = rng.integers(1, MAX_FRAMES_PER_UNIT + 1, size=len(units))
    return (np.repeat(units, frames) + speaker * self.units).astype(np.int32)

  def decode(self, codes) -> list[str]:
    """Codes -> words; a run that is no known word decodes to '<unk>' (for scoring TTS)."""
    units = np.asarray(codes, dtype=np.int64) % self.units
    if len(units) == 0:
      return []
    collapsed = units[np.r_[True, units[1:] != units[:-1]]]
    starts = np.flatnonzero(collapsed < len(self.words))
    words = ["<unk>"] if len(starts) == 0 or starts[0] != 0 else []
    for begin, end in zip(starts, list(starts[1:]) + [len(collapsed)]):
      word = self._onset_words[int(collapsed[begin])]
      words.append(word if tuple(collapsed[begin:end].tolist()) == self._units[word] else "<unk>")
    return words
