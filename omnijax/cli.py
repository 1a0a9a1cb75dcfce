"""The `omnijax` command: one entry point, one subcommand per job.

Each area registers its own subcommands (`register(subparsers)` in its `cli` module) and keeps
heavy imports inside the handlers, so `omnijax --help` stays fast. The global options set up
the process (omnijax.runtime.initialize) before any subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# The modules whose `register(subparsers)` add subcommands, in `omnijax --help` order.
COMMAND_AREAS = ("omnijax.train.cli", "omnijax.model.cli", "omnijax.data.cli", "omnijax.scaling",
                 "omnijax.golden")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="omnijax", description=__doc__.split("\n")[0])
  parser.add_argument("--host-devices", type=int, default=None,
                      help="force N host (CPU) devices, e.g. 8 to inspect an 8-way mesh on a CPU")
  processes = parser.add_argument_group(
      "multi-process jobs (all three, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
      "JAX_PROCESS_ID; TPU VM slices need none of them)")
  processes.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                         help="address of process 0's coordination service")
  processes.add_argument("--num-processes", type=int, default=None, metavar="N")
  processes.add_argument("--process-id", type=int, default=None, metavar="I")
  commands = parser.add_subparsers(dest="command", required=True)
  for area in COMMAND_AREAS:
    importlib.import_module(area).register(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from omnijax import runtime
  from omnijax.config import ConfigError
  try:
    runtime.initialize(host_devices=args.host_devices, coordinator=args.coordinator,
                       num_processes=args.num_processes, process_id=args.process_id,
                       distributed=getattr(args, "distributed", False))
    return args.func(args)
  except ConfigError as e:
    print(f"omnijax: config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
