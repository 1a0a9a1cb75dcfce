"""One pre-tokenized sample and its binary record encoding (the payload of a shard record).

Layout, little-endian:

    magic "OJ" | version u8 | task u8 | n_tokens u32 | response_start u32 | crc32 u32 | ids int32[n]

Format version 1 stops there. Version 2 (written only for a sample that carries typed fields,
e.g. float32 speech features [T, F]) continues with

    n_fields u8 | per field: name_len u8 | name utf-8 | dtype u8 | ndim u8 | dims u32[ndim] | data

The CRC covers everything after the header (ids and fields), so a flipped bit is caught by the
reader rather than trained on. Tail pads are not stored: the pipeline appends them per epoch
(reference §3).
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from typing import Mapping

import numpy as np

from omnijax.data.tasks import TASKS, task_index

TOKENS_ONLY_VERSION = 1
FORMAT_VERSION = 2  # the newest this reader knows; it reads every version up to it
MAGIC = b"OJ"
HEADER = struct.Struct("<2sBBIII")
FIELD_HEAD = struct.Struct("<BB")  # dtype code, ndim
# The field dtypes a record can hold, by their code on disk (append only).
FIELD_DTYPES = ("float32", "float16", "int32", "uint8")
MAX_FIELD_DIMS = 4


class RecordError(ValueError):
  """A record does not decode or breaks a sample invariant."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """What a shard directory declares about one typed field: its dtype and shape, None where a
  dimension may take any size (e.g. the frames of a speech clip)."""

  dtype: str
  shape: tuple[int | None, ...]

  def __post_init__(self):
    if self.dtype not in FIELD_DTYPES:
      raise ValueError(f"field dtype {self.dtype!r} is not one of {FIELD_DTYPES}")
    if not 1 <= len(self.shape) <= MAX_FIELD_DIMS or any(
        d is not None and (not isinstance(d, int) or d < 0) for d in self.shape):
      raise ValueError(f"field shape {list(self.shape)}: 1 to {MAX_FIELD_DIMS} sizes, each "
                       "an int >= 0 or None (any)")

  def describe(self) -> dict:
    """The manifest's form (JSON: null for any size)."""
    return dict(dtype=self.dtype, shape=list(self.shape))

  def shape_text(self) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in self.shape) + ")"


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
  """A templated conversation: ids [0, response_start) are prompt, the rest is the response.

  `fields` holds typed non-token arrays by name (e.g. "speech_features": float32 [T, F]); a
  shard directory declares which it may hold (FieldSpec), and a sample carries any of them.
  """

  task: str
  tokens: np.ndarray  # int32 [n]
  response_start: int
  fields: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    task_index(self.task)
    if self.tokens.ndim != 1 or self.tokens.dtype != np.int32:
      raise RecordError(f"tokens must be a 1-D int32 array, got {self.tokens.dtype}{self.tokens.shape}")
    # Position 0 is never a target under the logit shift, and an empty response teaches nothing.
    if not 0 < self.response_start < len(self.tokens):
      raise RecordError(f"response_start={self.response_start} must lie in [1, {len(self.tokens)})")
    if len(self.fields) > 255:
      raise RecordError(f"{len(self.fields)} fields: a record holds at most 255")
    for name, array in self.fields.items():
      if not isinstance(name, str) or not name.isidentifier() or len(name.encode()) > 255:
        raise RecordError(f"field name {name!r} is not an identifier of at most 255 bytes")
      if not isinstance(array, np.ndarray) or array.dtype.name not in FIELD_DTYPES:
        kind = array.dtype.name if isinstance(array, np.ndarray) else type(array).__name__
        raise RecordError(f"field {name!r}: dtype {kind}, a record holds {FIELD_DTYPES}")
      if not 1 <= array.ndim <= MAX_FIELD_DIMS:
        raise RecordError(f"field {name!r}: {array.ndim} dims, a record holds 1 to "
                          f"{MAX_FIELD_DIMS}")

  @property
  def prompt(self) -> np.ndarray:
    return self.tokens[:self.response_start]

  @property
  def response(self) -> np.ndarray:
    return self.tokens[self.response_start:]

  def __eq__(self, other):
    return (isinstance(other, Sample) and self.task == other.task
            and self.response_start == other.response_start
            and np.array_equal(self.tokens, other.tokens)
            and self.fields.keys() == other.fields.keys()
            and all(self.fields[name].dtype == other.fields[name].dtype
                    and np.array_equal(self.fields[name], other.fields[name])
                    for name in self.fields))


def _encode_fields(fields: Mapping[str, np.ndarray]) -> bytes:
  parts = [bytes([len(fields)])]
  for name, array in fields.items():
    encoded_name = name.encode()
    parts += [bytes([len(encoded_name)]), encoded_name,
              FIELD_HEAD.pack(FIELD_DTYPES.index(array.dtype.name), array.ndim),
              struct.pack(f"<{array.ndim}I", *array.shape),
              np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()]
  return b"".join(parts)


def encode(sample: Sample) -> bytes:
  """A sample without fields encodes as format version 1, exactly as before fields existed."""
  body = np.ascontiguousarray(sample.tokens, dtype="<i4").tobytes()
  version = TOKENS_ONLY_VERSION
  if sample.fields:
    body += _encode_fields(sample.fields)
    version = FORMAT_VERSION
  header = HEADER.pack(MAGIC, version, task_index(sample.task), len(sample.tokens),
                       sample.response_start, zlib.crc32(body))
  return header + body


class _Reader:
  """Reads the field table, naming what is short."""

  def __init__(self, data: bytes):
    self.data, self.at = data, 0

  def take(self, size: int, what: str) -> bytes:
    if self.at + size > len(self.data):
      raise RecordError(f"the field table ends inside {what}")
    chunk = self.data[self.at:self.at + size]
    self.at += size
    return chunk


def _decode_fields(data: bytes) -> dict[str, np.ndarray]:
  reader = _Reader(data)
  fields = {}
  for _ in range(reader.take(1, "the field count")[0]):
    name = reader.take(reader.take(1, "a field name")[0], "a field name").decode(errors="replace")
    code, ndim = FIELD_HEAD.unpack(reader.take(FIELD_HEAD.size, f"field {name!r}"))
    if code >= len(FIELD_DTYPES):
      raise RecordError(f"field {name!r}: unknown dtype code {code}")
    shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim, f"field {name!r}'s shape"))
    dtype = np.dtype(FIELD_DTYPES[code]).newbyteorder("<")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = reader.take(size, f"field {name!r}'s {size} bytes")
    fields[name] = np.frombuffer(raw, dtype).astype(FIELD_DTYPES[code]).reshape(shape)
  if reader.at != len(data):
    raise RecordError(f"{len(data) - reader.at} bytes after the last field")
  return fields


def decode(payload: bytes) -> Sample:
  """Bytes -> Sample; raises RecordError saying what is wrong."""
  if len(payload) < HEADER.size:
    raise RecordError(f"record has {len(payload)} bytes, shorter than the {HEADER.size}-byte header")
  magic, version, task, n_tokens, response_start, crc = HEADER.unpack_from(payload)
  if magic != MAGIC:
    raise RecordError(f"bad magic {magic!r} (expected {MAGIC!r})")
  if not TOKENS_ONLY_VERSION <= version <= FORMAT_VERSION:
    raise RecordError(f"record format version {version}, this reader knows "
                      f"{TOKENS_ONLY_VERSION} to {FORMAT_VERSION}")
  if task >= len(TASKS):
    raise RecordError(f"task index {task} is outside the {len(TASKS)} known tasks")
  body = payload[HEADER.size:]
  ids_size = 4 * n_tokens
  if len(body) < ids_size or (version == TOKENS_ONLY_VERSION and len(body) != ids_size):
    raise RecordError(f"header says {n_tokens} ids but the record holds {len(body)} bytes of ids")
  if zlib.crc32(body) != crc:
    what = "ids" if version == TOKENS_ONLY_VERSION else "ids or fields"
    raise RecordError(f"checksum mismatch: the {what} are corrupted")
  tokens = np.frombuffer(body[:ids_size], dtype="<i4").astype(np.int32)
  try:
    fields = _decode_fields(body[ids_size:]) if version > TOKENS_ONLY_VERSION else {}
    return Sample(TASKS[task], tokens, response_start, fields)
  except RecordError as e:
    raise RecordError(f"{TASKS[task]} record: {e}") from None
