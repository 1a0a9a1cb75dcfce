"""From decoded canvases to outputs (reference §4.7): trim, split by id range, image grids."""

from __future__ import annotations

import dataclasses

import numpy as np

from omnijax.vocab import Modality, Vocab


def trim(canvas, vocab: Vocab) -> np.ndarray:
  """The canvas up to (not including) its first `<|im_end|>` or `<|endoftext|>`."""
  canvas = np.asarray(canvas)
  ends = np.flatnonzero((canvas == vocab.im_end_id) | (canvas == vocab.pad_id))
  return canvas[:ends[0]] if len(ends) else canvas


def spoken_answer(canvas, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
  """A spoken answer's canvas (text, then `<|begin_of_audio|>` and speech codes) -> (text part,
  speech part): the ids before the first `<|begin_of_audio|>` (up to an `<|im_end|>`; the
  `<|endoftext|>` filler a prefilled `<|begin_of_audio|>` leaves around the text stays in, as
  a special token that decoding drops), and after it the ids up to `<|end_of_audio|>`,
  `<|im_end|>` or `<|endoftext|>`."""
  canvas = np.asarray(canvas)
  boa = np.flatnonzero(canvas == vocab.begin_audio_id)
  if not len(boa):
    return trim(canvas, vocab), canvas[:0]
  text = canvas[:boa[0]]
  text_end = np.flatnonzero(text == vocab.im_end_id)
  speech = canvas[boa[0] + 1:]
  ends = np.flatnonzero(np.isin(speech, [vocab.end_audio_id, vocab.im_end_id, vocab.pad_id]))
  return (text[:text_end[0]] if len(text_end) else text,
          speech[:ends[0]] if len(ends) else speech)


@dataclasses.dataclass(frozen=True)
class Parts:
  text: np.ndarray  # text token ids (specials dropped, as decode(skip_special_tokens=True))
  image: np.ndarray  # image codes, in order
  speech: np.ndarray  # speech codes, in order


def split_modalities(ids, vocab: Vocab) -> Parts:
  """Splits ids by the vocabulary's modality ranges; specials are dropped."""
  ids = np.asarray(ids, dtype=np.int64)
  modality = vocab.modality(ids)
  return Parts(text=ids[modality == Modality.TEXT].astype(np.int32),
               image=vocab.image_codes(ids[modality == Modality.IMAGE]),
               speech=vocab.speech_codes(ids[modality == Modality.SPEECH]))


def image_grid(codes, codes_per_image: int, n_image_codes: int) -> np.ndarray:
  """Exactly `codes_per_image` codes: short outputs repeat their last code (an empty one is all
  code 0), long ones are cut; values clamped to [0, n_image_codes)."""
  codes = np.asarray(codes, dtype=np.int64)
  if len(codes) == 0:
    codes = np.zeros((1,), np.int64)
  if len(codes) < codes_per_image:
    codes = np.concatenate([codes, np.full(codes_per_image - len(codes), codes[-1])])
  return np.clip(codes[:codes_per_image], 0, n_image_codes - 1).astype(np.int32)
