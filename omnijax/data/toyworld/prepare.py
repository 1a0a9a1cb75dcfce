"""Writes the toy world to disk: `tokenizer.json` plus one shard directory per split."""

from __future__ import annotations

import dataclasses
import os
import pathlib

from omnijax.data.shards import ShardWriter
from omnijax.data.speech_frontend import CMVN_FILE, write_cmvn
from omnijax.data.toyworld.world import SPLITS, ToyWorldSpec, build

TOKENIZER_FILE = "tokenizer.json"


def prepare(out_dir: str | os.PathLike, spec: ToyWorldSpec,
            max_shard_bytes: int = 64 << 20) -> dict[str, dict]:
  """Builds the world from `spec` and writes it under out_dir; returns the manifests by split."""
  out = pathlib.Path(out_dir)
  world = build(spec)
  out.mkdir(parents=True, exist_ok=True)
  world.tokenizer.save(str(out / TOKENIZER_FILE))
  speech = {}
  if world.cmvn is not None:
    write_cmvn(out / CMVN_FILE, world.cmvn)
    speech = dict(cmvn=f"../{CMVN_FILE}")
  manifests = {}
  for split in SPLITS:
    extra = dict(split=split, tokenizer=f"../{TOKENIZER_FILE}", scenes=len(world.scenes[split]),
                 toyworld=dataclasses.asdict(spec), **speech)
    with ShardWriter(out / split, spec.vocab, spec.image_lengths, max_shard_bytes,
                     extra=extra, fields=spec.fields) as writer:
      for sample in world.samples[split]:
        writer.write(sample)
    manifests[split] = writer.close()
  return manifests
