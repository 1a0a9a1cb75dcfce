"""Greedy packing of variable-length samples into fixed-length rows, as a checkpointable Grain stage.

Samples go into the current row in arrival order until the next one does not fit; that one starts
the next row (the release's greedy buffer, reference §6.3). A sample longer than a row is dropped
and counted in the row's `dropped` field, so the count survives worker processes.

Row fields (int32 [seq_len]): tokens (pad id after the last sample), segment_ids (1, 2, ... per
sample, 0 on padding), positions (restarting at 0 per sample, 0 on padding), response_mask, and
task_ids (-1 on padding); plus `dropped` (scalar).
"""

from __future__ import annotations

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
  """Packs elements {tokens, response_start, task_id} into rows of `seq_len`."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int):
    super().__init__(parent)
    self.seq_len, self.pad_id = seq_len, pad_id

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self.seq_len, self.pad_id)

  def __str__(self):
    return f"PackIterDataset(seq_len={self.seq_len})"


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len, self._pad_id = seq_len, pad_id
    # The sample that did not fit the last row, and the parent's state from just before it was
    # read: restoring that state re-reads it, so the carried sample never enters a checkpoint.
    self._carry = None
    self._carry_state = None

  def __next__(self):
    row, used, dropped = [], 0, 0
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
        if len(sample["tokens"]) > self._seq_len:
          dropped += 1
          continue
      if used + len(sample["tokens"]) > self._seq_len:
        self._carry, self._carry_state = sample, state
        break
      row.append(sample)
      used += len(sample["tokens"])
    return self._assemble(row, dropped)

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
    out["dropped"] = np.int32(dropped)
    return out

  def get_state(self):
    return self._carry_state if self._carry is not None else self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)
    self._carry = self._carry_state = None
