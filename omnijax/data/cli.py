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
  jsonl.add_argument("--allow-empty", action="store_true",
                     help="accept inputs without records (an empty split); without it they are "
                          "refused")
  jsonl.add_argument("--cmvn", help="the speech encoder's CMVN statistics (am.mvn): records' "
                     "\"audios\" become continuous speech features made with them")
  jsonl.add_argument("--mel-bins", type=int, default=80,
                     help="with --cmvn: the encoder's fbank bins (the release's: 80)")
  jsonl.add_argument("--seq-len", type=int, default=3072,
                     help="with --cmvn: the sequence length the shards train at; a record "
                          "whose audio makes it longer is refused")
  jsonl.add_argument("--speech-frames", type=int,
                     help="with --cmvn: the most frames a clip may have (data.speech_frames)")
  jsonl.set_defaults(func=run_prepare_jsonl)

  data = subparsers.add_parser("data", help="look at prepared shards")
  actions = data.add_subparsers(dest="data_action", required=True)
  inspect = actions.add_parser("inspect", help="validate every record and print statistics")
  inspect.add_argument("dir", help="a shard directory, or a directory of splits")
  inspect.set_defaults(func=run_inspect)


def run_prepare_toyworld(args: argparse.Namespace) -> int:
  from omnijax.data.toyworld.prepare import prepare
  from omnijax.data.toyworld.world import ToyWorldSpec
  from omnijax.files import output_lock

  try:
    spec = ToyWorldSpec(n=args.n, seed=args.seed, text_size=args.text_size,
                        n_image_codes=args.n_image_codes, n_speech_codes=args.n_speech_codes,
                        grid=args.grid, cells=args.cells, heldout_fraction=args.heldout_fraction,
                        validation_fraction=args.validation_fraction)
  except ValueError as e:
    print(f"omnijax prepare toyworld: {e}", file=sys.stderr)
    return 2
  with output_lock(args.out, "prepare toyworld"):
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


def _speech_input(args: argparse.Namespace):
  """--cmvn and its options -> a SpeechInput (None without --cmvn)."""
  from omnijax.config import ConfigError, SpeechEncoderConfig
  from omnijax.data.jsonl import SpeechInput
  from omnijax.data.speech_frontend import FrontendError, read_cmvn

  if args.cmvn is None:
    return None
  try:
    frontend = SpeechEncoderConfig(num_mel_bins=args.mel_bins)
  except ConfigError as e:
    raise ValueError(f"--mel-bins {args.mel_bins}: {e}") from None
  if args.seq_len < 8 or (args.speech_frames is not None and args.speech_frames < 1):
    raise ValueError(f"--seq-len {args.seq_len} must be >= 8 and --speech-frames >= 1")
  try:
    cmvn = read_cmvn(args.cmvn, frontend.feature_size)
  except FrontendError as e:
    raise ValueError(f"--cmvn {e}") from None
  return SpeechInput(frontend, cmvn, args.seq_len, args.speech_frames)


def run_prepare_jsonl(args: argparse.Namespace) -> int:
  from omnijax.data.jsonl import prepare_jsonl
  from omnijax.data.shards import ShardWriter
  from omnijax.data.speech_frontend import CMVN_FILE, write_cmvn
  from omnijax.data.templates import speech_field_specs
  from omnijax.data.templates import ChatTemplate, ImageLengths
  from omnijax.files import OutputBusyError, output_lock

  try:
    vocab = _vocab(args)
    lengths = ImageLengths(args.understanding_image_codes, args.generated_image_codes)
    template = ChatTemplate.from_file(args.tokenizer, vocab, lengths)
    out_dir = pathlib.Path(args.out) / args.split
    speech = _speech_input(args)
    extra = dict(split=args.split, sources=[str(p) for p in args.inputs])
    fields = {}
    if speech is not None:
      extra["cmvn"] = CMVN_FILE
      fields = speech_field_specs(speech.frontend.feature_size)
    with output_lock(out_dir, "prepare jsonl"):
      writer = ShardWriter(out_dir, vocab, lengths, int(args.max_shard_mb * 2**20), extra=extra,
                           fields=fields)
      if speech is not None:  # beside the shards, swapped in with them
        write_cmvn(writer.staged_path(CMVN_FILE), speech.cmvn)
      manifest = prepare_jsonl(args.inputs, writer, template, allow_empty=args.allow_empty,
                               speech=speech)
  except (ValueError, OSError, OutputBusyError) as e:
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
