"""The `omnijax` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys


def _quiet_libtpu_off_tpu() -> None:
  # libtpu (installed for AOT compilation) probes GCE metadata at import and warns loudly on
  # machines that are not TPU VMs; TPU VMs expose /dev/accel* or vfio devices.
  if not (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")):
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="YAML config under tpu_configs/")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, e.g. model.num_layers=4 mesh.tensor=2")


def _run_info(args) -> int:
  from omnijax.info import print_info
  return print_info(args.config, args.overrides)


def _run_convert(args) -> int:
  from omnijax.convert import run_convert
  return run_convert(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="omnijax", description=__doc__)
  parser.add_argument("--host-devices", type=int, default=None,
                      help="force N host (CPU) devices, e.g. 8 to inspect an 8-way mesh on a CPU")
  commands = parser.add_subparsers(dest="command", required=True)

  info = commands.add_parser("info", help="parameter counts, mesh and sharding table of a config")
  _add_config_args(info)
  info.set_defaults(func=_run_info)

  convert = commands.add_parser("convert", help="Hugging Face safetensors <-> omnijax weights")
  convert.add_argument("direction", choices=["from-hf", "to-hf"])
  convert.add_argument("source", help="HF directory (from-hf) or omnijax checkpoint dir (to-hf)")
  convert.add_argument("dest", help="omnijax checkpoint dir (from-hf) or HF directory (to-hf)")
  convert.add_argument("--vocab", default=None,
                       help="token layout when config.json has none: omni_diffusion or "
                            "compact:TEXT,IMAGE_CODES,SPEECH_CODES")
  convert.add_argument("--dtype", default="float32", help="export dtype (to-hf)")
  convert.set_defaults(func=_run_convert)

  from omnijax.data import cli as data_cli  # argparse only; heavy imports stay in the handlers
  data_cli.register(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  _quiet_libtpu_off_tpu()
  if args.host_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.host_devices}")
  from omnijax.config import ConfigError
  try:
    return args.func(args)
  except ConfigError as e:
    print(f"omnijax: config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
