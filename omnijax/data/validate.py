"""Structural checks of a templated sample that need only the vocabulary, not the tokenizer,
and of its typed fields against what the shard directory declares.

The writer runs them before a record reaches disk and `omnijax data inspect` runs them on every
record read back, so both agree on what a well-formed sample is.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from omnijax.data.record import FieldSpec, RecordError, Sample
from omnijax.data.templates import SPEECH_FIELDS, ImageLengths, speech_placeholders
from omnijax.vocab import Modality, Vocab


def check_sample(sample: Sample, vocab: Vocab, image_lengths: ImageLengths) -> None:
  """Raises RecordError on ids out of range, unbalanced markers, stray codes or a bad response."""
  ids = sample.tokens
  try:
    vocab.check_ids(ids)
  except ValueError as e:
    raise RecordError(str(e)) from None
  modality = vocab.modality(ids)
  spans = {  # begin marker -> (end marker, code modality, kind)
      vocab.begin_image_id: (vocab.end_image_id, Modality.IMAGE, "image"),
      vocab.begin_audio_id: (vocab.end_audio_id, Modality.SPEECH, "speech"),
  }
  ends = {end: kind for end, _, kind in spans.values()}
  clips = _clip_lengths(sample)
  index = 0
  while index < len(ids):
    token = int(ids[index])
    if token in ends:
      raise RecordError(f"{ends[token]} end marker at {index} without a begin marker")
    if modality[index] in (Modality.IMAGE, Modality.SPEECH):
      raise RecordError(f"code id {token} at {index} outside its begin/end markers")
    if token not in spans:
      index += 1
      continue
    end_marker, code_modality, kind = spans[token]
    stop = index + 1
    if kind == "speech" and index + 1 < len(ids) and ids[index + 1] == vocab.audio_context_id:
      _check_clip(sample, vocab, index, clips)
      index = stop + speech_placeholders(int(clips.pop(0))) + 1
      continue
    while stop < len(ids) and modality[stop] == code_modality:
      stop += 1
    if stop == len(ids) or ids[stop] != end_marker:
      raise RecordError(f"{kind} begin marker at {index} is not closed by its end marker")
    count = stop - index - 1
    if count == 0:
      raise RecordError(f"empty {kind} span at {index}")
    if kind == "image":
      in_response = index >= sample.response_start
      expected = image_lengths.generated if in_response else image_lengths.understanding
      if count != expected:
        raise RecordError(f"image at {index} has {count} codes, expected {expected} in the "
                          f"{'response' if in_response else 'prompt'}")
    index = stop + 1
  if clips:
    raise RecordError(f"{len(clips)} speech clips have no <|context_of_audio|> span")
  _check_turns(sample, vocab)


def _clip_lengths(sample: Sample) -> list[int]:
  """The frames of each of the sample's continuous speech clips (SPEECH_FIELDS), checked to
  agree with its features."""
  if SPEECH_FIELDS[0] not in sample.fields and SPEECH_FIELDS[1] not in sample.fields:
    return []
  if not all(name in sample.fields for name in SPEECH_FIELDS):
    raise RecordError(f"continuous speech needs both fields {SPEECH_FIELDS}")
  features, lengths = (sample.fields[name] for name in SPEECH_FIELDS)
  if lengths.ndim != 1 or features.ndim != 2 or (lengths < 1).any() or \
      lengths.sum() != len(features):
    raise RecordError(f"speech_lengths {lengths.tolist()} do not split speech_features of shape "
                      f"{features.shape} into clips of >= 1 frames")
  return lengths.tolist()


def _check_clip(sample: Sample, vocab: Vocab, index: int, clips: list[int]) -> None:
  """The continuous speech span at `index`: a prompt-side run of exactly the next clip's
  placeholders, closed by its end marker."""
  if not clips:
    raise RecordError(f"<|context_of_audio|> span at {index} without a speech clip for it")
  if index >= sample.response_start:
    raise RecordError(f"<|context_of_audio|> span at {index} in the response (continuous speech "
                      "is input only)")
  expected = speech_placeholders(clips[0])
  ids = sample.tokens
  stop = index + 1
  while stop < len(ids) and ids[stop] == vocab.audio_context_id:
    stop += 1
  if stop - index - 1 != expected or stop == len(ids) or ids[stop] != vocab.end_audio_id:
    raise RecordError(f"<|context_of_audio|> span at {index} holds {stop - index - 1} "
                      f"placeholders, its clip of {clips[0]} frames needs {expected} and then "
                      "<|end_of_audio|>")


def _check_turns(sample: Sample, vocab: Vocab) -> None:
  ids = sample.tokens
  if ids[0] != vocab.im_start_id:
    raise RecordError("the sample does not start with <|im_start|>")
  starts = np.flatnonzero(ids[:sample.response_start] == vocab.im_start_id)
  if np.any(ids[starts[-1]:sample.response_start] == vocab.im_end_id):
    raise RecordError(f"response_start={sample.response_start} is not inside the last turn header")
  ends = np.flatnonzero(sample.response == vocab.im_end_id)
  if len(ends) != 1 or ends[0] != len(sample.response) - 2:
    raise RecordError("the response must end with <|im_end|> and one newline token")
  if np.any(sample.response == vocab.im_start_id):
    raise RecordError("the response contains <|im_start|>")


def check_fields(sample: Sample, specs: Mapping[str, FieldSpec]) -> None:
  """Raises RecordError naming the field whose name, dtype or shape the specs do not allow.
  A sample may leave out a declared field (an image task carries no speech features)."""
  for name, array in sample.fields.items():
    if name not in specs:
      declared = ", ".join(sorted(specs)) or "none"
      raise RecordError(f"field {name!r} is not declared for these shards (declared: {declared})")
    check_field(name, array, specs[name])


def check_field(name: str, array: np.ndarray, spec: FieldSpec) -> None:
  if array.dtype.name != spec.dtype:
    raise RecordError(f"field {name!r}: dtype {array.dtype.name}, expected {spec.dtype}")
  if array.ndim != len(spec.shape) or any(
      size is not None and size != actual for size, actual in zip(spec.shape, array.shape)):
    raise RecordError(f"field {name!r}: shape {tuple(array.shape)}, expected {spec.shape_text()}")
