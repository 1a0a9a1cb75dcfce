"""Command-line entry points of the weights area (weights in and out, and what a config
builds), registered into `omnijax`'s argparse.

    omnijax info --config FILE [key=value ...]
    omnijax convert {from-hf,to-hf} SOURCE DEST [--vocab LAYOUT] [--dtype DTYPE] [--force]
                    [--grow-vocab LAYOUT [--seed N]]
"""

from __future__ import annotations

import argparse

from omnijax.config import add_config_args


def register(subparsers) -> None:
  """Adds `info` and `convert` to an argparse subparsers object."""
  info = subparsers.add_parser("info", help="parameter counts, mesh and sharding table of a config")
  add_config_args(info)
  info.set_defaults(func=run_info)

  convert = subparsers.add_parser("convert", help="Hugging Face safetensors <-> omnijax weights")
  convert.add_argument("direction", choices=["from-hf", "to-hf"])
  convert.add_argument("source", help="HF directory (from-hf) or omnijax checkpoint dir (to-hf)")
  convert.add_argument("dest", help="omnijax checkpoint dir (from-hf) or HF directory (to-hf)")
  convert.add_argument("--vocab", default=None,
                       help="token layout when config.json has none: omni_diffusion or "
                            "compact:TEXT,IMAGE_CODES,SPEECH_CODES")
  convert.add_argument("--dtype", default="float32", help="export dtype (to-hf)")
  convert.add_argument("--force", action="store_true",
                       help="from-hf: replace an existing omnijax model directory")
  convert.add_argument("--grow-vocab", default=None, metavar="LAYOUT",
                       help="from-hf: import into this bigger layout (omni_diffusion or "
                            "compact:TEXT,IMAGE_CODES,SPEECH_CODES), keeping the checkpoint's rows "
                            "and drawing the new ones from their mean and covariance")
  convert.add_argument("--seed", type=int, default=0, help="seed of the --grow-vocab draws")
  convert.set_defaults(func=run_convert)


def run_info(args: argparse.Namespace) -> int:
  from omnijax.weights.info import print_info
  return print_info(args.config, args.overrides)


def run_convert(args: argparse.Namespace) -> int:
  from omnijax.weights.convert import run_convert as convert
  return convert(args)
