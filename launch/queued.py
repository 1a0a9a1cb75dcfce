"""Queued resources: create the TPU slice(s), wait until they are ACTIVE, run a command on every
worker (as launch/tpu_vm.py does), and delete the slices on exit, whatever the outcome.

`--slices 2` asks for a multi-slice job (nodes NAME-0, NAME-1 joined over the data-center
network). `--dry-run` prints the exact commands instead of running them.

  python launch/queued.py --project P --zone us-east5-a --accelerator v5p-128 --name omni \\
      --spot -- omnijax train --config tpu_configs/experiments/omni7b_v5p128.yaml \\
      --workdir gs://bucket/omni
"""

from __future__ import annotations

import argparse
import sys

import common


def build(args) -> list[str]:
  cloud, accelerator = args.cloud, args.accelerator
  resource = f"{args.name}-qr"
  nodes = ([args.name] if args.slices == 1
           else [f"{args.name}-{index}" for index in range(args.slices)])
  placement = f"--node-id={args.name}" if args.slices == 1 else (
      f"--node-count={args.slices} --node-prefix={args.name}")
  tier = {"spot": " --spot", "reserved": " --reserved", "on-demand": ""}[args.tier]
  describe = (f"gcloud compute tpus queued-resources describe {resource} {cloud.flags()} "
              "--format='value(state.state)'")
  lines = [
      f"gcloud compute tpus queued-resources create {resource} {cloud.flags()} {placement} "
      f"--accelerator-type={accelerator.gcloud_type} "
      f"--runtime-version={accelerator.facts['runtime']}{tier}",
      # From here on the slices are deleted however the script ends (error, Ctrl-C, success).
      f"trap 'gcloud compute tpus queued-resources delete {resource} {cloud.flags()} "
      "--force --quiet' EXIT",
      "while true; do",
      f"  state=$({describe})",
      f'  echo "queued resource {resource}: ${{state}}"',
      '  case "${state}" in ACTIVE) break ;; FAILED|SUSPENDED) exit 1 ;; esac',
      f"  sleep {args.poll_seconds}",
      "done",
  ]
  lines += common.sync_and_install(cloud, nodes, args.run_name)
  lines += common.run_on_all_workers(cloud, nodes, accelerator.hosts, args.command,
                                     args.run_name, args.log_dir)
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True, help="TPU name (node prefix with --slices > 1)")
  parser.add_argument("--slices", type=int, default=1, help="slices joined over DCN")
  parser.add_argument("--tier", choices=("spot", "reserved", "on-demand"), default="on-demand")
  parser.add_argument("--poll-seconds", type=int, default=30)
  common.add_common_args(parser)
  args = common.parse_common(parser, argv)
  if args.slices < 1:
    parser.error(f"--slices={args.slices}: expected at least 1")
  return common.execute(build(args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
