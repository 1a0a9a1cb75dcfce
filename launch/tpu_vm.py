"""Run a command on every worker of existing TPU VM slices: copy this checkout, install it,
start the command on all workers at once, and stream each worker's log back.

One `--tpu` is one slice; several (`--tpu a --tpu b`) are joined into one multi-slice job over
the data-center network (MEGASCALE variables; give omnijax a mesh with DCN axes). `--dry-run`
prints the exact commands instead of running them.

  python launch/tpu_vm.py --project P --zone us-east5-a --accelerator v5p-128 --tpu my-v5p \\
      -- omnijax train --config tpu_configs/experiments/omni7b_v5p128.yaml --workdir gs://b/run
"""

from __future__ import annotations

import argparse
import sys

import common


def build(args) -> list[str]:
  lines = []
  if not args.skip_install:
    lines += common.sync_and_install(args.cloud, args.tpu, args.run_name)
  lines += common.run_on_all_workers(args.cloud, args.tpu, args.accelerator.hosts, args.command,
                                     args.run_name, args.log_dir)
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tpu", action="append", required=True,
                      help="TPU VM name; repeat for a multi-slice job (slice 0 first)")
  parser.add_argument("--skip-install", action="store_true",
                      help="the workers already hold this checkout and its venv")
  common.add_common_args(parser)
  args = common.parse_common(parser, argv)
  return common.execute(build(args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
