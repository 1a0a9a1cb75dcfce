"""Greedy packing of variable-length samples into fixed-length rows, as a checkpointable Grain stage.

Samples go into the current row in arrival order until the next one does not fit; that one starts
the next row (the release's greedy buffer, reference §6.3). A sample longer than a row is dropped
and counted in the row's `dropped` field, so the count survives worker processes.

Row fields (int32 [seq_len]): tokens (pad id after the last sample), segment_ids (1, 2, ... per
sample, 0 on padding), positions (restarting at 0 per sample, 0 on padding), response_mask, and
task_ids (-1 on padding); plus `dropped` (scalar).

Typed fields (e.g. speech features [T, F]) travel only where declared (`PackedField`): a row
holds `capacity` items of the field (entries along its first axis), the samples' items one
after another in segment order, and `<name>_segment_ids` [capacity] tags each item with its
sample's segment id (0 on unused items), so every array stays with its segment. A sample goes
to the next row when its tokens or its items do not fit, and is dropped (and counted) when they
cannot fit a row at all. A sample carrying an undeclared field is refused.

Continuous speech (`SpeechClips`): a sample's clips (`SPEECH_FIELDS`: features [sum of frames,
F] and frames per clip) go into the row's `speech_features` [K, T, F] (each clip from frame 0,
zeros after) and `speech_lengths` [K] (0: no clip), in segment order, which is the order of
the row's `<|context_of_audio|>` placeholders (themselves tokens, so counted in `seq_len`). A
sample goes to the next row when its clips do not fit the K left.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import grain
import numpy as np

from omnijax.data.record import FieldSpec
from omnijax.data.templates import SPEECH_FIELDS
from omnijax.data.validate import check_field

ROW_FIELDS = ("tokens", "segment_ids", "positions", "response_mask", "task_ids")


@dataclasses.dataclass(frozen=True)
class PackedField:
  """A typed field in packed rows: its spec, and how many items (first-axis entries) a row holds."""

  spec: FieldSpec
  capacity: int

  def __post_init__(self):
    if None in self.spec.shape[1:]:
      raise ValueError(f"a packed field's shape {self.spec.shape_text()} may vary in its first "
                       "axis only")
    if self.capacity < 1:
      raise ValueError(f"a packed field's capacity must be >= 1, got {self.capacity}")


@dataclasses.dataclass(frozen=True)
class SpeechClips:
  """A packed row's continuous speech: up to `clips` (K) clips of up to `frames` (T) frames of
  `feature_size` (F) each."""

  clips: int
  frames: int
  feature_size: int

  def __post_init__(self):
    if min(self.clips, self.frames, self.feature_size) < 1:
      raise ValueError(f"speech clips {self}: every size must be >= 1")

  def refusal(self, lengths: np.ndarray, features: np.ndarray) -> str | None:
    """Why a sample's clips can never be packed (None: they can)."""
    if len(lengths) > self.clips:
      return (f"{len(lengths)} speech clips, more than the {self.clips} a row holds "
              "(data.speech_clips)")
    if lengths.size and lengths.max() > self.frames:
      return (f"a speech clip of {lengths.max()} frames, more than the {self.frames} a row's "
              "clips hold (data.speech_frames)")
    if features.ndim != 2 or features.shape[1] != self.feature_size or len(features) != lengths.sum():
      return (f"speech features of shape {features.shape}, expected [{lengths.sum()}, "
              f"{self.feature_size}] (the clips' frames, the encoder's feature size)")
    return None


class PackIterDataset(grain.IterDataset):
  """Packs elements {tokens, response_start, task_id[, fields]} into rows of `seq_len`;
  `fields` (name -> PackedField) are the typed fields the rows carry, `speech` the rows'
  continuous speech clips (the samples' `SPEECH_FIELDS`)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int,
               fields: Mapping[str, PackedField] | None = None, speech: SpeechClips | None = None):
    super().__init__(parent)
    self.seq_len, self.pad_id, self.speech = seq_len, pad_id, speech
    self.fields = dict(fields or {})
    for name in self.fields:
      if {name, f"{name}_segment_ids"} & {*ROW_FIELDS, "dropped", *SPEECH_FIELDS}:
        raise ValueError(f"field {name!r} would clash with the row field of that name")

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self.seq_len, self.pad_id, self.fields,
                         self.speech)

  def __str__(self):
    return f"PackIterDataset(seq_len={self.seq_len})"


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, seq_len: int, pad_id: int, fields: dict[str, PackedField],
               speech: SpeechClips | None):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._fields, self._speech = seq_len, pad_id, fields, speech
    # The sample that did not fit the last row, and the parent's state from just before it was
    # read: restoring that state re-reads it, so the carried sample never enters a checkpoint.
    self._carry = None
    self._carry_state = None

  def __next__(self):
    row, used, dropped = [], 0, 0
    items_used = dict.fromkeys(self._item_names, 0)
    while True:
      if self._carry is not None:
        sample, state = self._carry, self._carry_state
        self._carry = None
      else:
        state = self._parent.get_state()
        try:
          sample = next(self._parent)
        except StopIteration:
          if row or dropped:
            break
          raise
      items = self._items(sample)
      if not self._fits(sample, items, 0, dict.fromkeys(self._item_names, 0)):
        dropped += 1
        continue
      if not self._fits(sample, items, used, items_used):
        self._carry, self._carry_state = sample, state
        break
      row.append(sample)
      used += len(sample["tokens"])
      for name, count in items.items():
        items_used[name] += count
    return self._assemble(row, dropped)

  @property
  def _item_names(self) -> list[str]:
    """What a row holds a limited number of: each field's items, and speech clips."""
    return [*self._fields, *(SPEECH_FIELDS[:1] if self._speech else ())]

  def _items(self, sample: dict) -> dict[str, int]:
    """Field name -> the sample's items, after checking each field against its declaration
    (speech_features -> the sample's clips)."""
    items = {}
    fields = dict(sample.get("fields", {}))
    if self._speech is not None and SPEECH_FIELDS[0] in fields:
      features, lengths = (fields.pop(name) for name in SPEECH_FIELDS)
      refusal = self._speech.refusal(lengths, features)
      if refusal:
        raise ValueError(f"a {sample.get('task', '')} sample carries {refusal}")
      items[SPEECH_FIELDS[0]] = len(lengths)
    for name, array in fields.items():
      if name not in self._fields:
        raise ValueError(f"a sample carries field {name!r}, which these packed rows do not hold "
                         f"(declared: {', '.join(sorted(self._fields)) or 'none'})")
      check_field(name, array, self._fields[name].spec)
      items[name] = len(array)
    return items

  def _fits(self, sample: dict, items: dict[str, int], used: int,
            items_used: dict[str, int]) -> bool:
    """Whether the sample fits a row that already holds `used` tokens and `items_used` items."""
    capacity = {name: packed.capacity for name, packed in self._fields.items()}
    if self._speech is not None:
      capacity[SPEECH_FIELDS[0]] = self._speech.clips
    return used + len(sample["tokens"]) <= self._seq_len and all(
        items_used[name] + count <= capacity[name] for name, count in items.items())

  def _assemble(self, row: list[dict], dropped: int) -> dict[str, np.ndarray]:
    length = self._seq_len
    out = dict(tokens=np.full(length, self._pad_id, np.int32),
               segment_ids=np.zeros(length, np.int32), positions=np.zeros(length, np.int32),
               response_mask=np.zeros(length, np.int32), task_ids=np.full(length, -1, np.int32))
    start = 0
    for segment, sample in enumerate(row, 1):
      n = len(sample["tokens"])
      span = slice(start, start + n)
      out["tokens"][span] = sample["tokens"]
      out["segment_ids"][span] = segment
      out["positions"][span] = np.arange(n)
      out["response_mask"][start + sample["response_start"]:start + n] = 1
      out["task_ids"][span] = sample["task_id"]
      start += n
    out.update(self._assemble_fields(row))
    if self._speech is not None:
      out.update(self._assemble_speech(row))
    out["dropped"] = np.int32(dropped)
    return out

  def _assemble_speech(self, row: list[dict]) -> dict[str, np.ndarray]:
    speech = self._speech
    features = np.zeros((speech.clips, speech.frames, speech.feature_size), np.float32)
    lengths = np.zeros(speech.clips, np.int32)
    clip = 0
    for sample in row:
      fields = sample.get("fields", {})
      if SPEECH_FIELDS[0] not in fields:
        continue
      starts = np.cumsum(fields["speech_lengths"]) - fields["speech_lengths"]
      for start, length in zip(starts, fields["speech_lengths"]):
        features[clip, :length] = fields["speech_features"][start:start + length]
        lengths[clip] = length
        clip += 1
    return dict(speech_features=features, speech_lengths=lengths)

  def _assemble_fields(self, row: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for name, packed in self._fields.items():
      items = np.zeros((packed.capacity, *packed.spec.shape[1:]), packed.spec.dtype)
      segment_ids = np.zeros(packed.capacity, np.int32)
      start = 0
      for segment, sample in enumerate(row, 1):
        array = sample.get("fields", {}).get(name)
        if array is not None:
          items[start:start + len(array)] = array
          segment_ids[start:start + len(array)] = segment
          start += len(array)
      out[name], out[f"{name}_segment_ids"] = items, segment_ids
    return out

  def get_state(self):
    return self._carry_state if self._carry is not None else self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)
    self._carry = self._carry_state = None
