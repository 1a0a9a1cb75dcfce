"""Command-line entry point of the training area, registered into `omnijax`'s argparse.

    omnijax train --config FILE [--workdir DIR] [--stage N] [--max-steps N] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from omnijax.config import add_config_args


def register(subparsers) -> None:
  """Adds `train` to an argparse subparsers object."""
  train = subparsers.add_parser("train", help="run the configured training stages (resumes)")
  add_config_args(train)
  train.add_argument("--workdir", default=None,
                     help="checkpoints, metrics and plots (default runs/<config name>)")
  train.add_argument("--stage", default=None,
                     help="run only this stage: its number (2) or name (stage2)")
  train.add_argument("--max-steps", type=int, default=None,
                     help="stop after this global step, with a checkpoint")
  train.add_argument("--checkpoint-every", type=int, default=None)
  train.add_argument("--log-every", type=int, default=None)
  # Every process of a multi-host job runs training (see omnijax.processes.initialize).
  train.set_defaults(func=run_train, distributed=True)


def run_train(args: argparse.Namespace) -> int:
  import pathlib

  from omnijax.config import load_config
  from omnijax.train.loop import TrainingDiverged, train

  overrides = list(args.overrides)
  if args.checkpoint_every is not None:
    overrides.append(f"train.checkpoint_every={args.checkpoint_every}")
  if args.log_every is not None:
    overrides.append(f"train.log_every={args.log_every}")
  config = load_config(args.config, overrides)
  workdir = args.workdir or str(pathlib.Path("runs") / pathlib.Path(args.config).stem)
  args.workdir = workdir  # resolved, for what runs after training (omnijax.eval.cli)
  try:
    result = train(config, workdir, only_stage=args.stage, max_steps=args.max_steps)
  except TrainingDiverged as e:
    print(f"omnijax train: {e}", file=sys.stderr)
    return 3
  if result["stopped"]:
    print(f"stopped by {result['stopped']} at step {result['step']} after saving a checkpoint")
  return 0
