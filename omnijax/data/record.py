"""One pre-tokenized sample and its binary record encoding (the payload of a shard record).

Layout, little-endian, format version 1:

    magic "OJ" | version u8 | task u8 | n_tokens u32 | response_start u32 | crc32 u32 | ids int32[n]

The CRC covers the ids, so a flipped bit is caught by the reader rather than trained on. Tail pads
are not stored: the pipeline appends them per epoch (reference §3).
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np

from omnijax.data.tasks import TASKS, task_index

FORMAT_VERSION = 1
MAGIC = b"OJ"
HEADER = struct.Struct("<2sBBIII")


class RecordError(ValueError):
  """A record does not decode or breaks a sample invariant."""


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
  """A templated conversation: ids [0, response_start) are prompt, the rest is the response."""

  task: str
  tokens: np.ndarray  # int32 [n]
  response_start: int

  def __post_init__(self):
    task_index(self.task)
    if self.tokens.ndim != 1 or self.tokens.dtype != np.int32:
      raise RecordError(f"tokens must be a 1-D int32 array, got {self.tokens.dtype}{self.tokens.shape}")
    # Position 0 is never a target under the logit shift, and an empty response teaches nothing.
    if not 0 < self.response_start < len(self.tokens):
      raise RecordError(f"response_start={self.response_start} must lie in [1, {len(self.tokens)})")

  @property
  def prompt(self) -> np.ndarray:
    return self.tokens[:self.response_start]

  @property
  def response(self) -> np.ndarray:
    return self.tokens[self.response_start:]

  def __eq__(self, other):
    return (isinstance(other, Sample) and self.task == other.task
            and self.response_start == other.response_start
            and np.array_equal(self.tokens, other.tokens))


def encode(sample: Sample) -> bytes:
  ids = np.ascontiguousarray(sample.tokens, dtype="<i4").tobytes()
  header = HEADER.pack(MAGIC, FORMAT_VERSION, task_index(sample.task), len(sample.tokens),
                       sample.response_start, zlib.crc32(ids))
  return header + ids


def decode(payload: bytes) -> Sample:
  """Bytes -> Sample; raises RecordError saying what is wrong."""
  if len(payload) < HEADER.size:
    raise RecordError(f"record has {len(payload)} bytes, shorter than the {HEADER.size}-byte header")
  magic, version, task, n_tokens, response_start, crc = HEADER.unpack_from(payload)
  if magic != MAGIC:
    raise RecordError(f"bad magic {magic!r} (expected {MAGIC!r})")
  if version != FORMAT_VERSION:
    raise RecordError(f"record format version {version}, this reader knows {FORMAT_VERSION}")
  if task >= len(TASKS):
    raise RecordError(f"task index {task} is outside the {len(TASKS)} known tasks")
  body = payload[HEADER.size:]
  if len(body) != 4 * n_tokens:
    raise RecordError(f"header says {n_tokens} ids but the record holds {len(body)} bytes of ids")
  if zlib.crc32(body) != crc:
    raise RecordError("checksum mismatch: the ids are corrupted")
  tokens = np.frombuffer(body, dtype="<i4").astype(np.int32)
  try:
    return Sample(TASKS[task], tokens, response_start)
  except RecordError as e:
    raise RecordError(f"{TASKS[task]} record: {e}") from None
