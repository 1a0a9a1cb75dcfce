"""Command-line entry points of the data package, registered into `omnijax`'s argparse.

    omnijax prepare toyworld --out DIR --n N --seed S [sizes]
    omnijax prepare jsonl FILE... --out DIR --tokenizer tokenizer.json [layout]
    omnijax data inspect DIR
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from omnijax.vocab import Vocab


def register(subparsers) -> None:
  """Adds `prepare {toyworld,jsonl}` and `data inspect` to an argparse subparsers object."""
  prepare = subparsers.add_parser("prepare", help="tokenize data into shards")
  kinds = prepare.add_subparsers(dest="prepare_kind", required=True)

  toy = kinds.add_parser("toyworld",
                         help="generate the toy world (all tasks; train, validation, heldout)")
  toy.add_argument("--out", required=True, help="output directory")
  toy.add_argument("--n", type=int, default=2000, help="number of distinct scenes")
  toy.add_argument("--seed", type=int, default=0)
  toy.add_argument("--text-size", type=int, default=512)
  toy.add_argument("--n-image-codes", type=int, default=256)
  toy.add_argument("--n-speech-codes", type=int, default=256)
  toy.add_argument("--grid", type=int, default=16, help="image side in codes")
  toy.add_argument("--cells", type=int, default=2, choices=(2, 3), help="scene grid side")
  toy.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="scenes held out for the reported figures")
  toy.add_argument("--validation-fraction", type=float, default=0.05,
                   help="scenes held back from training for recipe choices")
  toy.set_defaults(func=run_prepare_toyworld)

  jsonl = kinds.add_parser("jsonl", help="template release-style jsonl with tokenized media")
  jsonl.add_argument("inputs", nargs="+", help="jsonl files")
  jsonl.add_argument("--out", required=True, help="output directory (shards go to OUT/SPLIT)")
  jsonl.add_argument("--split", default="train")
  jsonl.add_argument("--tokenizer", required=True, help="tokenizer.json (Qwen2's for the release)")
  jsonl.add_argument("--layout", choices=("omni_diffusion", "compact"), default="omni_diffusion")
  jsonl.add_argument("--text-size", type=int, help="compact layout only")
  jsonl.add_argument("--n-image-codes", type=int, help="compact layout only")
  jsonl.add_argument("--n-speech-codes", type=int, help="compact layout only")
  jsonl.add_argument("--understanding-image-codes", type=int, default=1024)
  jsonl.add_argument("--generated-image-codes", type=int, default=256)
  jsonl.add_argument("--max-shard-mb", type=float, default=256)
  jsonl.set_defaults(func=run_prepare_jsonl)

  data = subparsers.add_parser("data", help="look at prepared shards")
  actions = data.add_subparsers(dest="data_action", required=True)
  inspect = actions.add_parser("inspect", help="validate every record and print statistics")
  inspect.add_argument("dir", help="a shard directory, or a directory of splits")
  inspect.set_defaults(func=run_inspect)


def run_prepare_toyworld(args: argparse.Namespace) -> int:
  from omnijax.data.toyworld.prepare import prepare
  from omnijax.data.toyworld.world import ToyWorldSpec

  try:
    spec = ToyWorldSpec(n=args.n, seed=args.seed, text_size=args.text_size,
                        n_image_codes=args.n_image_codes, n_speech_codes=args.n_speech_codes,
                        grid=args.grid, cells=args.cells, heldout_fraction=args.heldout_fraction,
                        validation_fraction=args.validation_fraction)
  except ValueError as e:
    print(f"omnijax prepare toyworld: {e}", file=sys.stderr)
    return 2
  manifests = prepare(args.out, spec)
  for split, manifest in manifests.items():
    total = manifest["total"]
    print(f"{pathlib.Path(args.out) / split}: {total['records']} records, {total['tokens']} tokens")
  return 0


def _vocab(args: argparse.Namespace) -> Vocab:
  if args.layout == "omni_diffusion":
    return Vocab.omni_diffusion()
  sizes = (args.text_size, args.n_image_codes, args.n_speech_codes)
  if None in sizes:
    raise ValueError("--layout compact needs --text-size, --n-image-codes and --n-speech-codes")
  return Vocab.compact(args.text_size, n_image_codes=args.n_image_codes,
                       n_speech_codes=args.n_speech_codes)


def run_prepare_jsonl(args: argparse.Namespace) -> int:
  from omnijax.data.jsonl import prepare_jsonl
  from omnijax.data.shards import ShardWriter
  from omnijax.data.templates import ChatTemplate, ImageLengths

  try:
    vocab = _vocab(args)
    lengths = ImageLengths(args.understanding_image_codes, args.generated_image_codes)
    template = ChatTemplate.from_file(args.tokenizer, vocab, lengths)
    writer = ShardWriter(pathlib.Path(args.out) / args.split, vocab, lengths,
                         int(args.max_shard_mb * 2**20),
                         extra=dict(split=args.split, sources=[str(p) for p in args.inputs]))
    manifest = prepare_jsonl(args.inputs, writer, template)
  except (ValueError, OSError) as e:
    print(f"omnijax prepare jsonl: {e}", file=sys.stderr)
    return 1
  print(f"{writer.out_dir}: {manifest['total']['records']} records, "
        f"{manifest['total']['tokens']} tokens")
  return 0


def run_inspect(args: argparse.Namespace) -> int:
  from omnijax.data.inspect import format_stats, inspect_split, split_dirs

  try:
    for split_dir in split_dirs(args.dir):
      print(format_stats(str(split_dir), inspect_split(split_dir)))
  except (ValueError, OSError) as e:  # ShardError and ManifestError are ValueErrors
    print(f"omnijax data inspect: {e}", file=sys.stderr)
    return 1
  return 0
