"""`omnijax data inspect`: reads back every record of a shard directory and checks it.

A record that does not decode or breaks a sample invariant, a shard holding fewer or more records
than the manifest lists (a truncated file reads back as empty), or totals that disagree with the
manifest raise `ShardError` naming the file and the record index.
"""

from __future__ import annotations

import collections
import os
import pathlib

import numpy as np

from omnijax.data import record, shards
from omnijax.data.shards import ShardError
from omnijax.data.tasks import TASKS
from omnijax.data.validate import check_fields, check_sample
from omnijax.vocab import Vocab


def split_dirs(path: str | os.PathLike) -> list[pathlib.Path]:
  """`path` itself if it holds a manifest, else its subdirectories that do (e.g. train, heldout)."""
  path = pathlib.Path(path)
  # exists(), not is_file(): a manifest that is not a regular file is named by load_manifest.
  if (path / shards.MANIFEST).exists():
    return [path]
  found = (sorted(p for p in path.iterdir() if (p / shards.MANIFEST).exists())
           if path.is_dir() else [])
  if not found:
    raise shards.ManifestError(f"{path}: no {shards.MANIFEST} here or in a subdirectory")
  return found


def _read_shard(path: pathlib.Path, expected_records: int):
  reader = shards.open_shard(path, expected_records)
  try:
    for index in range(expected_records):
      try:
        payload = reader.read([index])[0]
      except RuntimeError as e:
        raise ShardError(f"{path}: record {index}: unreadable: {e}") from None
      yield index, payload
  finally:
    shards.close_quietly(reader)


def inspect_split(shard_dir: str | os.PathLike) -> dict[str, dict]:
  """Validates every record; returns per-task stats (records, tokens, response tokens, lengths)."""
  shard_dir = pathlib.Path(shard_dir)
  manifest = shards.load_manifest(shard_dir)
  vocab = Vocab(**{key: manifest["vocab"][key]
                   for key in ("text_size", "n_speech_codes", "n_image_codes")})
  shards.check_vocab(manifest, vocab, str(shard_dir / shards.MANIFEST))
  image_lengths = shards.image_lengths_of(manifest)
  fields = shards.field_specs(manifest)
  lengths = collections.defaultdict(list)
  response = collections.defaultdict(int)
  for shard in manifest["shards"]:
    path = shard_dir / shard["file"]
    for index, payload in _read_shard(path, shard["records"]):
      try:
        sample = record.decode(payload)
        if sample.task != shard["task"]:
          raise record.RecordError(f"a {sample.task} record in a {shard['task']} shard")
        check_sample(sample, vocab, image_lengths)
        check_fields(sample, fields)
      except record.RecordError as e:
        raise ShardError(f"{path}: record {index}: {e}") from None
      lengths[sample.task].append(len(sample.tokens))
      response[sample.task] += len(sample.response)
  stats = {}
  for task in TASKS:
    if task not in lengths:
      continue
    task_lengths = np.asarray(lengths[task])
    stats[task] = dict(records=len(task_lengths), tokens=int(task_lengths.sum()),
                       response_tokens=response[task], min_len=int(task_lengths.min()),
                       mean_len=float(task_lengths.mean()), max_len=int(task_lengths.max()))
    listed = manifest["tasks"].get(task, {})
    for key in ("records", "tokens", "response_tokens"):
      if listed.get(key) != stats[task][key]:
        raise ShardError(f"{shard_dir / shards.MANIFEST}: {task} {key} is {stats[task][key]} in the "
                         f"shards but {listed.get(key)} in the manifest")
  return stats


def format_stats(name: str, stats: dict[str, dict]) -> str:
  header = f"{'task':8} {'records':>8} {'tokens':>10} {'response':>10} {'min':>6} {'mean':>8} {'max':>6}"
  lines = [f"{name}:", header]
  for task, s in stats.items():
    lines.append(f"{task:8} {s['records']:8d} {s['tokens']:10d} {s['response_tokens']:10d} "
                 f"{s['min_len']:6d} {s['mean_len']:8.1f} {s['max_len']:6d}")
  total = {key: sum(s[key] for s in stats.values()) for key in ("records", "tokens", "response_tokens")}
  lines.append(f"{'total':8} {total['records']:8d} {total['tokens']:10d} {total['response_tokens']:10d}")
  return "\n".join(lines)
