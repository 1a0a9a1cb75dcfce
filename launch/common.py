"""Shared by the launch scripts: TPU accelerator facts and the gcloud commands they run.

Every launcher builds one bash script and either prints it (`--dry-run`: the exact commands,
nothing contacts a cloud) or runs it. The omnijax package never imports this folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import shlex
import subprocess
import sys

# Per TPU generation: the gcloud accelerator-type prefix, TensorCores per chip (v4/v5p names
# count cores, v5e/v6e names count chips), chips per host in multi-host slices, the largest
# single-host slice, the TPU VM software version, and GKE's node label.
GENERATIONS = {
    "v4": dict(gcloud="v4", cores_per_chip=2, chips_per_host=4, single_host_chips=4,
               runtime="tpu-ubuntu2204-base", gke="tpu-v4-podslice"),
    "v5p": dict(gcloud="v5p", cores_per_chip=2, chips_per_host=4, single_host_chips=4,
                runtime="v2-alpha-tpuv5", gke="tpu-v5p-slice"),
    "v5e": dict(gcloud="v5litepod", cores_per_chip=1, chips_per_host=4, single_host_chips=8,
                runtime="v2-alpha-tpuv5-lite", gke="tpu-v5-lite-podslice"),
    "v6e": dict(gcloud="v6e", cores_per_chip=1, chips_per_host=4, single_host_chips=8,
                runtime="v2-alpha-tpuv6e", gke="tpu-v6e-slice"),
}
# Chip topologies GKE asks for (cloud.google.com/gke-tpu-topology), by chip count.
TOPOLOGIES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16"}
TOPOLOGIES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                 256: "16x16"}
MEGASCALE_PORT = 8080
REMOTE_DIR = "~/omnijax"  # pip's line spells it ${HOME}/omnijax (quoted extras)
REMOTE_VENV = "~/omnijax-venv"


class LaunchError(ValueError):
  """A launch option is wrong; the message names it."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str  # as users write it: v5p-128, v5e-256
  generation: str
  size: int  # the number in the name

  @classmethod
  def parse(cls, name: str) -> Accelerator:
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
      raise LaunchError(f"--accelerator={name!r}: expected e.g. v5p-128, v5e-256, v6e-64, v4-32")
    generation = "v5e" if match.group(1) == "v5litepod" else match.group(1)
    accelerator = cls(f"{generation}-{match.group(2)}", generation, int(match.group(2)))
    facts = GENERATIONS[generation]
    if accelerator.size % facts["cores_per_chip"] or accelerator.chips not in (
        TOPOLOGIES_3D if accelerator.is_3d else TOPOLOGIES_2D):
      raise LaunchError(f"--accelerator={name!r}: no {generation} slice of that size")
    return accelerator

  @property
  def facts(self) -> dict:
    return GENERATIONS[self.generation]

  @property
  def is_3d(self) -> bool:
    return self.generation in ("v4", "v5p")

  @property
  def chips(self) -> int:
    return self.size // self.facts["cores_per_chip"]

  @property
  def hosts(self) -> int:
    if self.chips <= self.facts["single_host_chips"]:
      return 1
    return self.chips // self.facts["chips_per_host"]

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def gcloud_type(self) -> str:
    return f"{self.facts['gcloud']}-{self.size}"

  @property
  def topology(self) -> str:
    return (TOPOLOGIES_3D if self.is_3d else TOPOLOGIES_2D)[self.chips]


@dataclasses.dataclass(frozen=True)
class Cloud:
  project: str
  zone: str

  def flags(self) -> str:
    return f"--zone={self.zone} --project={self.project}"


def q(text: str) -> str:
  return shlex.quote(text)


def tpu_vm(cloud: Cloud, verb: str, name: str, *rest: str) -> str:
  return " ".join(["gcloud compute tpus tpu-vm", verb, name, cloud.flags(), *rest])


def sync_and_install(cloud: Cloud, tpus: list[str], run_name: str) -> list[str]:
  """Copies this checkout (without .git, runs/, data/) to every worker and installs it there."""
  archive = f"/tmp/omnijax-{run_name}.tar.gz"
  commands = [f"tar czf {archive} --exclude=.git --exclude=./runs --exclude=./data "
              "--exclude=./.venv --exclude=./logs ."]
  install = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
             f"tar xzf ~/omnijax-{run_name}.tar.gz -C {REMOTE_DIR} && "
             f"python3 -m venv {REMOTE_VENV} && {REMOTE_VENV}/bin/pip install -q -e "
             '"${HOME}/omnijax[tpu,gcs]"')
  for tpu in tpus:
    commands.append(tpu_vm(cloud, "scp", archive, f"{tpu}:~/", "--worker=all"))
    commands.append(tpu_vm(cloud, "ssh", tpu, "--worker=all", f"--command={q(install)}"))
  return commands


def run_on_all_workers(cloud: Cloud, tpus: list[str], hosts: int, command: list[str],
                       run_name: str, log_dir: str) -> list[str]:
  """Starts `command` on every worker of every slice at once (each its own ssh), each worker's
  output streamed into LOG_DIR/<tpu>-worker-<i>.log, and fails if any worker fails. Several
  slices also get the MEGASCALE variables that join them over the data-center network."""
  lines = [f"mkdir -p {log_dir}", "pids=()", "workers=()"]
  if len(tpus) > 1:
    lines.append("coordinator_ip=$(" + tpu_vm(
        cloud, "describe", tpus[0], "--format='value(networkEndpoints[0].ipAddress)'") + ")")
  for slice_id, tpu in enumerate(tpus):
    env = ""
    if len(tpus) > 1:
      env = (f"export MEGASCALE_COORDINATOR_ADDRESS=${{coordinator_ip}}:{MEGASCALE_PORT} "
             f"MEGASCALE_PORT={MEGASCALE_PORT} MEGASCALE_NUM_SLICES={len(tpus)} "
             f"MEGASCALE_SLICE_ID={slice_id} && ")
    remote = (f"cd {REMOTE_DIR} && mkdir -p logs && {REMOTE_VENV}/bin/"
              f"{' '.join(q(part) for part in command)} 2>&1 | tee logs/{run_name}.log; "
              "exit ${PIPESTATUS[0]}")
    # Double-quoted locally so that only ${coordinator_ip} expands here; the rest reaches the
    # worker's shell as written.
    remote = env + re.sub(r'([\\"$`])', r"\\\1", remote)
    lines += [
        f"for worker in $(seq 0 {hosts - 1}); do",
        "  " + tpu_vm(cloud, "ssh", tpu, "--worker=${worker}", f'--command="{remote}"')
        + f" > {log_dir}/{tpu}-worker-${{worker}}.log 2>&1 &",
        f'  pids+=($!); workers+=("{tpu} worker ${{worker}}")',
        "done",
    ]
  lines += [
      "status=0",
      'for i in "${!pids[@]}"; do',
      '  wait "${pids[$i]}" || { echo "${workers[$i]} failed; see its log in '
      f'{log_dir}/" >&2; status=1; }}',
      "done",
      f'echo "per-worker logs: {log_dir}/"',
      'exit "${status}"',
  ]
  return lines


def add_common_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--project", required=True)
  parser.add_argument("--zone", required=True)
  parser.add_argument("--accelerator", required=True, help="e.g. v5p-128, v5e-256")
  parser.add_argument("--run-name", default=None, help="names logs and archives (default: time)")
  parser.add_argument("--log-dir", default=None, help="local per-worker logs (default logs/RUN)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="after --: what every worker runs, e.g. omnijax train --config ...")


def parse_common(parser: argparse.ArgumentParser, argv: list[str] | None):
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command every worker runs after --, e.g. -- omnijax train --config X")
  args.command = command
  try:
    args.accelerator = Accelerator.parse(args.accelerator)
  except LaunchError as e:
    parser.error(str(e))
  args.run_name = args.run_name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  args.log_dir = args.log_dir or f"logs/{args.run_name}"
  args.cloud = Cloud(args.project, args.zone)
  return args


def execute(lines: list[str], dry_run: bool) -> int:
  """Prints the script (dry run) or runs it with bash, stopping at the first failing command."""
  script = "\n".join(["set -euo pipefail", *lines]) + "\n"
  if dry_run:
    sys.stdout.write(script)
    return 0
  return subprocess.run(["bash", "-c", script]).returncode
