"""Words as speech-code sequences with speaker variation and duration jitter, and the decoder.

Each speaker owns a block of `units` codes. A word is an onset unit unique to it followed by one
or two body units; every unit lasts 1-3 frames: drawn afresh for each utterance (a user's
speech), or each unit's own fixed length (a steady voice: the assistant's, so what it says is a
function of the text, as a TTS voice's prosody is). Onsets and bodies come from disjoint unit
sets and no word repeats a unit back to back, so collapsing repeats and cutting at onsets
recovers the words exactly, whoever speaks.

For continuous speech input the codes are also rendered as waveforms (`render`): each unit a
short tone at its own pitch (units spaced evenly on the mel scale, so each lands in its own
part of the fbank), each speaker its own timbre (the weight of the second harmonic), and every
utterance its own small pitch, loudness and tempo jitter.
"""

from __future__ import annotations

import numpy as np

SPEAKERS = 4
MAX_FRAMES_PER_UNIT = 3
# A rendered code frame lasts this long (before tempo jitter); the units' tones span this band.
FRAME_SECONDS = 0.04
LOWEST_HZ, HIGHEST_HZ = 150.0, 3800.0  # the second harmonic stays below 8 kHz
# Per-utterance jitter: pitch and tempo by up to this fraction, loudness within this range.
PITCH_JITTER, TEMPO_JITTER = 0.01, 0.1
LOUDNESS = (0.3, 0.8)
EDGE_SECONDS = 0.05  # silence before and after the utterance
NOISE = 0.003  # background noise amplitude


def _mel(hz):
  return 1127.0 * np.log1p(np.asarray(hz) / 700.0)


def _hz(mel):
  return 700.0 * np.expm1(np.asarray(mel) / 1127.0)


class SpeechCodebook:

  def __init__(self, words: tuple[str, ...], n_speech_codes: int, speakers: int = SPEAKERS):
    self.words, self.speakers = words, speakers
    self.units = n_speech_codes // speakers
    self.body_units = self.units - len(words)
    if self.body_units < 2:
      raise ValueError(f"{n_speech_codes} speech codes cannot hold {len(words)} words for "
                       f"{speakers} speakers (need more than {speakers * (len(words) + 1)})")
    # A fixed, seed-independent pronunciation per word and length per unit of the steady voice:
    # one model of the world across datasets.
    rng = np.random.default_rng(0)
    self._units = {}
    for onset, word in enumerate(words):
      body = rng.choice(self.body_units, size=1 + len(word) % 2, replace=False) + len(words)
      self._units[word] = (onset, *body.tolist())
    self._onset_words = dict(enumerate(words))
    self._steady_frames = rng.integers(1, MAX_FRAMES_PER_UNIT + 1, size=self.units)

  def encode(self, words: list[str], speaker: int, rng: np.random.Generator | None) -> np.ndarray:
    """Words -> int32 speech codes of one speaker, each unit held for 1-3 frames: drawn from
    `rng`, or with rng None each unit's own steady length."""
    if not 0 <= speaker < self.speakers:
      raise ValueError(f"speaker {speaker} outside [0, {self.speakers})")
    units = []
    for word in words:
      if word not in self._units:
        raise ValueError(f"the toy world has no pronunciation for {word!r}")
      units += self._units[word]
    frames = (self._steady_frames[units] if rng is None else
              rng.integers(1, MAX_FRAMES_PER_UNIT + 1, size=len(units)))
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

  def unit_pitches(self) -> np.ndarray:
    """Hz of each unit's tone, evenly spaced in mel from LOWEST_HZ to HIGHEST_HZ."""
    return _hz(np.linspace(_mel(LOWEST_HZ), _mel(HIGHEST_HZ), self.units))

  def render(self, codes, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """Speech codes -> float32 waveform in [-1, 1] at `sample_rate`: each run of one unit a
    tone of its pitch with the speaker's timbre, 5 ms fades at each edge; the pitch, loudness
    and tempo of the whole utterance drawn from `rng`."""
    codes = np.asarray(codes, dtype=np.int64)
    if not len(codes):
      raise ValueError("no speech codes to render")
    pitch = 1 + rng.uniform(-PITCH_JITTER, PITCH_JITTER)
    tempo = 1 + rng.uniform(-TEMPO_JITTER, TEMPO_JITTER)
    loudness = rng.uniform(*LOUDNESS)
    pitches = self.unit_pitches()
    edge = np.zeros(int(EDGE_SECONDS * sample_rate), np.float32)
    pieces = [edge]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    for begin, end in zip(starts, [*starts[1:], len(codes)]):
      unit, speaker = codes[begin] % self.units, codes[begin] // self.units
      samples = int(round((end - begin) * FRAME_SECONDS * tempo * sample_rate))
      t = np.arange(samples) / sample_rate
      phase = 2 * np.pi * pitches[unit] * pitch * t
      harmonic = 0.15 + 0.25 * speaker / max(self.speakers - 1, 1)
      tone = (np.sin(phase) + harmonic * np.sin(2 * phase)) / (1 + harmonic)
      fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.005)
      pieces.append((loudness * tone * fade).astype(np.float32))
    pieces.append(edge)
    waveform = np.concatenate(pieces)
    waveform += NOISE * rng.standard_normal(len(waveform)).astype(np.float32)
    return np.clip(waveform, -1.0, 1.0).astype(np.float32)
