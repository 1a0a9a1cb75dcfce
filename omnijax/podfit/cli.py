"""Command-line entry points of the pod-fit area (what a run costs on a pod, before it runs),
registered into `omnijax`'s argparse. All three need libtpu (the TPU compiler).

    omnijax compile --config FILE [--topology NAME] [--stage N] [--out REPORT.json] [key=value ...]
    omnijax scaling --config FILE --generation GEN [--chips 4,8] [--strategies ...] --out DIR
    omnijax shardings [EXPERIMENT ...] [--update] [--golden-dir DIR]
"""

from __future__ import annotations

import argparse
import pathlib

from omnijax.config import ConfigError, add_config_args
from omnijax.podfit.golden import GOLDEN_DIR
from omnijax.podfit.scaling import GENERATIONS, STRATEGIES


def register(subparsers) -> None:
  """Adds `compile`, `scaling` and `shardings` to an argparse subparsers object."""
  compile_ = subparsers.add_parser(
      "compile", help="compile the train step for a TPU topology ahead of time (needs libtpu)")
  add_config_args(compile_)
  compile_.add_argument("--topology", default=None, help="override topology.name, e.g. v5e:2x4")
  compile_.add_argument("--stage", default=None, help="whose optimizer (default: first stage)")
  compile_.add_argument("--out", default=None, metavar="REPORT.json",
                        help="also write the report as JSON (exit status 3: does not fit)")
  compile_.set_defaults(func=run_compile)

  scaling = subparsers.add_parser(
      "scaling", help="compile the train step over a TPU generation's slices and strategies; "
                      "table + plot of per-chip memory and predicted step time (needs libtpu)")
  add_config_args(scaling)
  scaling.add_argument("--generation", required=True, choices=GENERATIONS)
  scaling.add_argument("--chips", default=None,
                       help="comma-separated chip counts (default: every shipped single slice)")
  scaling.add_argument("--strategies", default=",".join(STRATEGIES),
                       help=f"comma-separated, from {', '.join(STRATEGIES)}")
  scaling.add_argument("--stage", default=None, help="whose optimizer (default: first stage)")
  scaling.add_argument("--global-batch", type=int, default=None,
                       help="global batch of every point (default: the config's)")
  scaling.add_argument("--rows-per-chip", type=int, default=1,
                       help="rows per batch shard in each micro-batch (sets grad accumulation)")
  scaling.add_argument("--tensor", type=int, default=4, help="tensor axis of fsdp_tensor")
  scaling.add_argument("--data", type=int, default=2, help="data axis of data_fsdp")
  scaling.add_argument("--out", required=True, help="directory for scaling.csv/.json/.png")
  scaling.set_defaults(func=run_scaling)

  shardings = subparsers.add_parser(
      "shardings", help="check (or --update) the golden parameter shardings of the shipped "
                        "experiments (needs libtpu)")
  shardings.add_argument("experiments", nargs="*", help="experiment names (default: all)")
  shardings.add_argument("--update", action="store_true",
                         help="rewrite the goldens from the current code (an intended change)")
  shardings.add_argument("--golden-dir", default=str(GOLDEN_DIR))
  shardings.set_defaults(func=run_shardings)


def run_compile(args: argparse.Namespace) -> int:
  from omnijax.config import load_config
  from omnijax.podfit.aot import DOES_NOT_FIT_EXIT, compile_train_step, write_report

  overrides = list(args.overrides)
  if args.topology:
    overrides.append(f"topology.name={args.topology}")
  report, _ = compile_train_step(load_config(args.config, overrides), stage=args.stage)
  print(report.describe())
  if args.out:
    write_report(report, args.out)
  return 0 if report.fits else DOES_NOT_FIT_EXIT


def _int_list(text: str, flag: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",")]
  except ValueError:
    raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None
  if min(values) < 1:
    raise ConfigError(f"{flag} {text!r}: expected positive integers")
  return values


def run_scaling(args: argparse.Namespace) -> int:
  from omnijax.podfit.aot import DOES_NOT_FIT_EXIT
  from omnijax.podfit.scaling import (shipped_topologies, smallest_fits, strategy_mesh, sweep,
                                      write_outputs)

  for flag in ("rows_per_chip", "tensor", "data"):
    if getattr(args, flag) < 1:
      raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")

  strategies = args.strategies.split(",")
  for strategy in strategies:
    strategy_mesh(strategy, args.tensor, args.data)  # rejects unknown names before compiling
  overrides = list(args.overrides)
  if args.global_batch is not None:
    overrides.append(f"data.global_batch_size={args.global_batch}")
  chips = (_int_list(args.chips, "--chips") if args.chips is not None
           else sorted(shipped_topologies(args.generation)))
  rows = sweep(args.config, overrides, args.generation, chips,
               strategies, args.stage, args.tensor, args.data, args.rows_per_chip)
  title = (f"{pathlib.Path(args.config).stem} on {args.generation}"
           + (f", stage {args.stage}" if args.stage else ""))
  write_outputs(rows, pathlib.Path(args.out), title)
  best = smallest_fits(rows)
  for strategy in strategies:
    row = best.get(strategy)
    print(f"{strategy}: " + (f"smallest slice that fits: {row['topology']} ({row['chips']} chips, "
                             f"{row['peak_bytes_per_chip'] / 2**30:.2f} GiB per chip)"
                             if row else "fits on none of the swept slices"))
  print(f"wrote {args.out}/scaling.csv, scaling.json, scaling.png")
  return 0 if best else DOES_NOT_FIT_EXIT


def run_shardings(args: argparse.Namespace) -> int:
  from omnijax.podfit.golden import check_or_update

  return check_or_update(args.experiments, pathlib.Path(args.golden_dir), args.update)
