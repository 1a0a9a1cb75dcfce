"""The Grain input pipeline: shards -> task mixture -> tail pads -> packed rows -> global batches.

Per task: record indices, shuffled afresh every epoch from the seed and repeated forever; each
sample gets k ~ U{tail_pads_min..tail_pads_max} supervised `<|endoftext|>` pads (the upper end
the task's own where `task_tail_pads_max` names it) drawn from (seed, task, epoch, record), so a
restart reproduces them. Tasks are interleaved by the mixture weights, each process takes every
process_count-th sample, rows are packed to `seq_len` and batched, optionally in worker
processes, and each local batch becomes part of a global `jax.Array`.

Shards whose records carry continuous speech (`SPEECH_FIELDS`, CMVN-applied features made at
prepare time: docs/data.md says why features rather than audio) give batches
`speech_features` [batch, K, T, F] and `speech_lengths` [batch, K], K = data.speech_clips and
T = data.speech_frames; a record whose clips can never fit those is an error naming it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import grain
import jax
import numpy as np

from omnijax.config import ConfigError, DataConfig
from omnijax.data import record, shards
from omnijax.data.packing import ROW_FIELDS, PackIterDataset, SpeechClips
from omnijax.data.tasks import TASKS
from omnijax.data.templates import SPEECH_FIELDS
from omnijax.vocab import Vocab

BATCH_FIELDS = ROW_FIELDS
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class _LoadWithTailPads(grain.transforms.MapWithIndex):
  """(index in the repeated task stream, record index) -> sample dict with fresh tail pads."""

  source: Any  # grain ArrayRecordDataSource of one task's shards
  files: tuple[tuple[str, int], ...]  # (shard path, records) in source order, for error messages
  records: int
  task_id: int
  seed: int
  tail_pads_min: int
  tail_pads_max: int
  pad_id: int
  speech: SpeechClips | None

  def _where(self, record_index: int) -> str:
    for path, records in self.files:
      if record_index < records:
        return f"{path}: record {record_index}"
      record_index -= records
    return f"record {record_index}"

  def map_with_index(self, index: int, record_index: int) -> dict:
    try:
      sample = record.decode(self.source[record_index])
    except (record.RecordError, RuntimeError) as e:  # RuntimeError: array_record read failures
      shard_dir = pathlib.Path(self.files[0][0]).parent
      raise shards.ShardError(f"{self._where(record_index)}: {str(e).splitlines()[0]} (`omnijax "
                              f"data inspect {shard_dir}` checks every record)") from None
    if self.speech is not None and SPEECH_FIELDS[0] in sample.fields:
      refusal = self.speech.refusal(sample.fields["speech_lengths"],
                                    sample.fields["speech_features"])
      if refusal:
        raise shards.ShardError(f"{self._where(record_index)}: the record carries {refusal}")
    epoch = index // self.records
    rng = np.random.default_rng([self.seed, self.task_id, epoch, record_index])
    pads = int(rng.integers(self.tail_pads_min, self.tail_pads_max + 1))
    tokens = np.concatenate([sample.tokens, np.full(pads, self.pad_id, np.int32)])
    return dict(tokens=tokens, response_start=sample.response_start, task_id=self.task_id,
                fields=dict(sample.fields))


def mixture_weights(config: DataConfig, manifest: dict, where: str) -> dict[str, float]:
  """Task -> weight > 0: the config's mixture, or every task in the shards at weight 1."""
  weights = dict(config.mixture) or {task: 1.0 for task in manifest["tasks"]}
  weights = {task: weight for task, weight in weights.items() if weight > 0}
  if not weights:
    raise ConfigError("data.mixture gives every task weight 0")
  for task in weights:
    if not manifest["tasks"].get(task, {}).get("records"):
      raise ConfigError(f"data.mixture.{task}: {where} holds no {task} records")
  return {task: weights[task] for task in TASKS if task in weights}


def speech_clips(config: DataConfig, manifest: dict, where: str) -> SpeechClips | None:
  """The rows' speech clips for shards that carry continuous speech (None for shards without);
  other typed fields are refused: no batch field or model input reads them, and training
  without them would silently drop what they hold."""
  fields = shards.field_specs(manifest)
  other = sorted(set(fields) - set(SPEECH_FIELDS))
  if other:
    raise shards.ManifestError(f"{where}: the records carry typed fields ({', '.join(other)}) "
                               "that training does not read")
  if not fields:
    return None
  return SpeechClips(config.speech_clips, config.speech_frames,
                     fields[SPEECH_FIELDS[0]].shape[1])


def batch_shapes(config: DataConfig, speech: SpeechClips | None, rows: int) -> dict[str, tuple]:
  """Field -> the shape of a batch of `rows` rows."""
  shapes = {name: (rows, config.seq_len) for name in BATCH_FIELDS}
  if speech is not None:
    shapes.update(speech_features=(rows, speech.clips, speech.frames, speech.feature_size),
                  speech_lengths=(rows, speech.clips))
  return shapes


def build_dataset(config: DataConfig, vocab: Vocab, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """The per-process Grain dataset of local batches (numpy dicts, `BATCH_FIELDS` + `dropped`)."""
  shard_dir = pathlib.Path(config.dir) / config.split
  manifest = shards.load_manifest(shard_dir)
  shards.check_vocab(manifest, vocab, str(shard_dir / shards.MANIFEST))
  shards.check_shards(shard_dir, manifest)
  speech = speech_clips(config, manifest, str(shard_dir / shards.MANIFEST))
  if config.global_batch_size % process_count:
    raise ConfigError(f"data.global_batch_size={config.global_batch_size} is not divisible by "
                      f"the {process_count} processes")
  weights = mixture_weights(config, manifest, str(shard_dir))
  streams = []
  for task, weight in weights.items():
    paths = shards.shard_paths(shard_dir, manifest, task)
    source = grain.sources.ArrayRecordDataSource(paths)
    task_id = TASKS.index(task)
    files = tuple(zip(paths, (shard["records"] for shard in manifest["shards"]
                              if shard["task"] == task)))
    load = _LoadWithTailPads(source, files, len(source), task_id, config.seed,
                             config.tail_pads_min,
                             config.task_tail_pads_max.get(task, config.tail_pads_max),
                             vocab.pad_id, speech)
    streams.append(grain.MapDataset.range(len(source))
                   .shuffle(seed=config.seed * len(TASKS) + task_id)
                   .repeat(None)  # reseeds the shuffle every epoch
                   .map_with_index(load))
  mixed = grain.MapDataset.mix(streams, list(weights.values()))[process_index::process_count]
  rows = PackIterDataset(mixed.to_iter_dataset(), config.seq_len, vocab.pad_id, speech=speech)
  batches = rows.batch(config.global_batch_size // process_count, drop_remainder=True)
  if config.num_workers:
    _allow_grain_flags_outside_absl_app()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
  return batches


def _allow_grain_flags_outside_absl_app() -> None:
  # Grain's workers read absl flags, which raise unless parsed; omnijax does not run under absl.app.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Batches:
  """Iterator of global batches: dict field -> int32 [global_batch, seq_len] `jax.Array` (and
  the speech fields, `shapes` says all).

  `sharding` (e.g. NamedSharding(mesh, P(("data", "fsdp")))) places each process's rows; without
  one, batches stay numpy (benchmarks, inspection). `dropped_samples` counts samples longer than
  `seq_len` that were skipped. `get_state()` is JSON-serialisable and `set_state()` on a fresh
  `Batches` of the same config continues with exactly the batch that would have come next.
  """

  def __init__(self, config: DataConfig, vocab: Vocab, sharding: jax.sharding.Sharding | None = None,
               process_index: int | None = None, process_count: int | None = None):
    self.config, self.sharding = config, sharding
    self.process_count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    shard_dir = pathlib.Path(config.dir) / config.split
    speech = speech_clips(config, shards.load_manifest(shard_dir),
                          str(shard_dir / shards.MANIFEST))
    self.shapes = batch_shapes(config, speech, config.global_batch_size)
    self._iterator = iter(build_dataset(config, vocab, index, self.process_count))
    self.dropped_samples = 0
    self.batches_served = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    local = next(self._iterator)
    self.dropped_samples += int(local.pop("dropped").sum())
    self.batches_served += 1
    if self.sharding is None:
      return local
    # The sharding splits the rows (the first axis); a speech field's other axes stay whole.
    return {name: jax.make_array_from_process_local_data(self.sharding, local[name], shape)
            for name, shape in self.shapes.items()}

  def get_state(self) -> dict:
    return dict(version=STATE_VERSION, grain=self._iterator.get_state(),
                dropped_samples=self.dropped_samples, batches_served=self.batches_served)

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r}, expected "
                       f"{STATE_VERSION}")
    self._iterator.set_state(state["grain"])
    self.dropped_samples = state["dropped_samples"]
    self.batches_served = state["batches_served"]

  def close(self) -> None:
    """Stops worker processes (without it, an abandoned iterator leaks shared memory)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
