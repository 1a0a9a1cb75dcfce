"""Shard directories: per-task ArrayRecord files of encoded samples plus a JSON manifest.

A directory holds `<task>-<nnnnn>.array_record` files (one family per task, so a mixture reads
each task's files as its own source) and `manifest.json`: format version, vocabulary layout, image
lengths, per-task record and token counts, and every shard with its record count. A shard that
reads back fewer records than the manifest lists is truncated. A directory whose records may
carry typed fields declares them under `fields` (name -> dtype and shape) with format version 2;
one without stays format version 1, byte for byte as before fields existed.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
from typing import Any, Mapping

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from omnijax.messages import quoted
from omnijax.data import record
from omnijax.data.record import FieldSpec, Sample
from omnijax.data.tasks import TASKS
from omnijax.data.templates import SPEECH_FIELDS, ImageLengths
from omnijax.data.validate import check_fields, check_sample
from omnijax.files import NotRegularFileError, check_regular_file, replace_dir, staging_dir
from omnijax.vocab import Vocab

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
# group_size:1 keeps every record individually addressable: Grain reads records at random.
WRITER_OPTIONS = "group_size:1"


class ManifestError(ValueError):
  """A shard directory's manifest is missing, unreadable or incompatible with the model."""


class ShardError(ValueError):
  """A shard's content is corrupt or disagrees with its manifest."""


class ShardWriter:
  """Validates and appends samples, rotating each task's shard once it passes `max_shard_bytes`.

  `fields` declares the typed fields the samples may carry (a sample with another, or with a
  declared one of the wrong dtype or shape, is refused).

  Shards are written into a staging directory beside `out_dir`; `close()` swaps the complete set
  in, so an existing dataset in `out_dir` stays whole until then, and `abort()` (or an exception
  inside `with`) leaves it exactly as it was.
  """

  def __init__(self, out_dir: str | os.PathLike, vocab: Vocab, image_lengths: ImageLengths,
               max_shard_bytes: int = 256 << 20, extra: dict[str, Any] | None = None,
               fields: Mapping[str, FieldSpec] | None = None):
    self.out_dir = pathlib.Path(out_dir)
    if self.out_dir.exists() and not self.out_dir.is_dir():
      raise NotADirectoryError(f"{self.out_dir} exists and is not a directory")
    self._staging = staging_dir(self.out_dir)
    self.vocab, self.image_lengths = vocab, image_lengths
    self.max_shard_bytes = max_shard_bytes
    self.extra = extra or {}
    self.fields = dict(fields or {})
    self._open: dict[str, tuple[ArrayRecordWriter, dict]] = {}
    self._shards: list[dict] = []
    self._stats = collections.defaultdict(lambda: dict(records=0, tokens=0, response_tokens=0))
    self._manifest: dict | None = None

  def staged_path(self, name: str) -> pathlib.Path:
    """Where to write a file that goes into `out_dir` with the shards (on close, at once)."""
    return self._staging / name

  def write(self, sample: Sample) -> None:
    check_sample(sample, self.vocab, self.image_lengths)
    check_fields(sample, self.fields)
    payload = record.encode(sample)
    writer, shard = self._writer_for(sample.task)
    writer.write(payload)
    shard["records"] += 1
    shard["bytes"] += len(payload)
    stats = self._stats[sample.task]
    stats["records"] += 1
    stats["tokens"] += len(sample.tokens)
    stats["response_tokens"] += len(sample.response)
    if shard["bytes"] >= self.max_shard_bytes:
      writer.close()
      del self._open[sample.task]

  def _writer_for(self, task: str):
    if task not in self._open:
      number = sum(shard["task"] == task for shard in self._shards)
      shard = dict(file=f"{task}-{number:05d}{SHARD_SUFFIX}", task=task, records=0, bytes=0)
      self._shards.append(shard)
      self._open[task] = (ArrayRecordWriter(str(self._staging / shard["file"]), WRITER_OPTIONS),
                          shard)
    return self._open[task]

  def _close_shards(self) -> None:
    for writer, _ in self._open.values():
      writer.close()
    self._open.clear()

  def abort(self) -> None:
    """Drops everything written so far; `out_dir` keeps what it held before."""
    try:
      self._close_shards()
    finally:
      shutil.rmtree(self._staging, ignore_errors=True)

  def close(self) -> dict:
    """Closes open shards, writes the manifest and swaps the complete directory into `out_dir`."""
    if self._manifest is not None:
      return self._manifest
    tasks = {task: self._stats[task] for task in TASKS if task in self._stats}
    declared = {}
    if self.fields:
      declared["fields"] = {name: spec.describe() for name, spec in self.fields.items()}
    manifest = dict(
        format_version=record.FORMAT_VERSION if self.fields else record.TOKENS_ONLY_VERSION,
        vocab=self.vocab.describe(), **declared,
        image_lengths=dict(understanding=self.image_lengths.understanding,
                           generated=self.image_lengths.generated),
        tasks=tasks,
        total={key: sum(stats[key] for stats in tasks.values())
               for key in ("records", "tokens", "response_tokens")},
        shards=self._shards, **self.extra)
    try:
      self._close_shards()
      (self._staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
      replace_dir(self._staging, self.out_dir)
    except BaseException:
      self.abort()
      raise
    self._manifest = manifest
    return manifest

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def load_manifest(shard_dir: str | os.PathLike) -> dict:
  path = pathlib.Path(shard_dir) / MANIFEST
  try:
    check_regular_file(path)
    manifest = json.loads(path.read_text())
  except FileNotFoundError:
    raise ManifestError(f"{path} does not exist: not a shard directory (run `omnijax prepare`)") from None
  except NotRegularFileError as e:
    raise ManifestError(str(e)) from None
  except json.JSONDecodeError as e:
    raise ManifestError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(manifest, dict):
    raise ManifestError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
  version = manifest.get("format_version")
  if version not in range(record.TOKENS_ONLY_VERSION, record.FORMAT_VERSION + 1):
    raise ManifestError(f"{path}: format_version {quoted(version)}, this reader knows "
                        f"{record.TOKENS_ONLY_VERSION} to {record.FORMAT_VERSION}")
  unknown = sorted(set(manifest["tasks"]) - set(TASKS))
  if unknown:
    raise ManifestError(f"{path}: unknown task {quoted(unknown[0])}")
  field_specs(manifest, where=str(path))
  return manifest


def field_specs(manifest: dict, where: str = MANIFEST) -> dict[str, FieldSpec]:
  """The typed fields a shard directory declares (none before format version 2)."""
  specs = {}
  for name, spec in manifest.get("fields", {}).items():
    try:
      specs[name] = FieldSpec(spec["dtype"], tuple(spec["shape"]))
    except (KeyError, TypeError):
      raise ManifestError(f'{where}: fields.{name}: expected {{"dtype": ..., "shape": [...]}}, '
                          f"got {spec!r}") from None
    except ValueError as e:
      raise ManifestError(f"{where}: fields.{name}: {e}") from None
  return specs


def check_speech(manifest: dict, speech_encoder, where: str) -> None:
  """Shards with continuous speech must suit the model's encoder: it exists, its features are as
  wide as the records', and the shards name the CMVN statistics their features were made with."""
  specs = field_specs(manifest, where)
  if SPEECH_FIELDS[0] not in specs:
    return
  width = specs[SPEECH_FIELDS[0]].shape[1]
  if speech_encoder is None:
    raise ManifestError(f"{where}: the records carry continuous speech, and the model has no "
                        "speech encoder (model.speech_encoder)")
  if width != speech_encoder.feature_size:
    raise ManifestError(f"{where}: the records' speech features are {width} wide, the model's "
                        f"encoder reads {speech_encoder.feature_size} (model.speech_encoder "
                        "num_mel_bins x lfr_m); re-prepare the data or fix the model config")
  if not isinstance(manifest.get("cmvn"), str):
    raise ManifestError(f"{where}: the records carry continuous speech but name no CMVN "
                        "statistics (\"cmvn\")")


def cmvn_path(shard_dir: str | os.PathLike, manifest: dict) -> pathlib.Path | None:
  """The am.mvn the shards' speech features were normalised with (None: no continuous speech)."""
  if "cmvn" not in manifest:
    return None
  return pathlib.Path(shard_dir) / manifest["cmvn"]


def image_lengths_of(manifest: dict) -> ImageLengths:
  return ImageLengths(**manifest["image_lengths"])


def check_vocab(manifest: dict, vocab: Vocab, where: str) -> None:
  """The shards' vocabulary layout must equal the model's, id for id."""
  expected, found = vocab.describe(), manifest["vocab"]
  if found != expected:
    diffs = ", ".join(f"{key}: shards {found.get(key)} vs model {value}"
                      for key, value in expected.items() if found.get(key) != value)
    raise ManifestError(f"{where}: the shards were tokenized for another vocabulary layout "
                        f"({diffs}); re-prepare the data or fix model.vocab")


def shard_paths(shard_dir: str | os.PathLike, manifest: dict, task: str) -> list[str]:
  return [str(pathlib.Path(shard_dir) / shard["file"])
          for shard in manifest["shards"] if shard["task"] == task]


def open_shard(path: str | os.PathLike, expected_records: int) -> ArrayRecordReader:
  """A reader of one shard, after checking it holds the records its manifest lists (a truncated
  file reads back as fewer, often none)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ShardError(f"{path}: record 0: the shard listed in the manifest is missing")
  try:
    check_regular_file(path)
  except NotRegularFileError as e:
    raise ShardError(f"{path}: record 0: {e.strerror}, not the shard the manifest lists") from None
  try:
    reader = ArrayRecordReader(str(path))
  except RuntimeError as e:  # a damaged footer fails at open
    raise ShardError(f"{path}: record 0: unreadable: {str(e).splitlines()[0]}") from None
  count = reader.num_records()
  if count != expected_records:
    close_quietly(reader)
    raise ShardError(f"{path}: record {min(count, expected_records)}: the shard holds {count} "
                     f"records, the manifest lists {expected_records} (truncated or replaced file)")
  return reader


def close_quietly(reader: ArrayRecordReader) -> None:
  try:
    reader.close()
  except RuntimeError:
    pass  # a damaged file's reader fails to close too; the error already raised says more


def check_shards(shard_dir: str | os.PathLike, manifest: dict) -> None:
  """Every shard the manifest lists exists and holds as many records as it says."""
  for shard in manifest["shards"]:
    close_quietly(open_shard(pathlib.Path(shard_dir) / shard["file"], shard["records"]))
