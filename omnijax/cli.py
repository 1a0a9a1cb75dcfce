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
    # libtpu's lock file guards chips against a second process; without chips there is none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="YAML config under tpu_configs/")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, e.g. model.num_layers=4 mesh.tensor=2")


def _run_info(args) -> int:
  from omnijax.info import print_info
  return print_info(args.config, args.overrides)


def _run_train(args) -> int:
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
  try:
    result = train(config, workdir, only_stage=args.stage, max_steps=args.max_steps)
  except TrainingDiverged as e:
    print(f"omnijax train: {e}", file=sys.stderr)
    return 3
  if result["stopped"]:
    print(f"stopped by {result['stopped']} at step {result['step']} after saving a checkpoint")
  return 0


def _run_compile(args) -> int:
  from omnijax.aot import DOES_NOT_FIT_EXIT, compile_train_step, write_report
  from omnijax.config import load_config

  overrides = list(args.overrides)
  if args.topology:
    overrides.append(f"topology.name={args.topology}")
  report, _ = compile_train_step(load_config(args.config, overrides), stage=args.stage)
  print(report.describe())
  if args.out:
    write_report(report, args.out)
  return 0 if report.fits else DOES_NOT_FIT_EXIT


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

  train = commands.add_parser("train", help="run the configured training stages (resumes)")
  _add_config_args(train)
  train.add_argument("--workdir", default=None,
                     help="checkpoints, metrics and plots (default runs/<config name>)")
  train.add_argument("--stage", default=None,
                     help="run only this stage: its number (2) or name (stage2)")
  train.add_argument("--max-steps", type=int, default=None,
                     help="stop after this global step, with a checkpoint")
  train.add_argument("--checkpoint-every", type=int, default=None)
  train.add_argument("--log-every", type=int, default=None)
  train.set_defaults(func=_run_train)

  compile_ = commands.add_parser(
      "compile", help="compile the train step for a TPU topology ahead of time (needs libtpu)")
  _add_config_args(compile_)
  compile_.add_argument("--topology", default=None, help="override topology.name, e.g. v5e:2x4")
  compile_.add_argument("--stage", default=None, help="whose optimizer (default: first stage)")
  compile_.add_argument("--out", default=None, metavar="REPORT.json",
                        help="also write the report as JSON (exit status 3: does not fit)")
  compile_.set_defaults(func=_run_compile)

  convert = commands.add_parser("convert", help="Hugging Face safetensors <-> omnijax weights")
  convert.add_argument("direction", choices=["from-hf", "to-hf"])
  convert.add_argument("source", help="HF directory (from-hf) or omnijax checkpoint dir (to-hf)")
  convert.add_argument("dest", help="omnijax checkpoint dir (from-hf) or HF directory (to-hf)")
  convert.add_argument("--vocab", default=None,
                       help="token layout when config.json has none: omni_diffusion or "
                            "compact:TEXT,IMAGE_CODES,SPEECH_CODES")
  convert.add_argument("--dtype", default="float32", help="export dtype (to-hf)")
  convert.add_argument("--grow-vocab", default=None, metavar="LAYOUT",
                       help="from-hf: import into this bigger layout (omni_diffusion or "
                            "compact:TEXT,IMAGE_CODES,SPEECH_CODES), keeping the checkpoint's rows "
                            "and drawing the new ones from their mean and covariance")
  convert.add_argument("--seed", type=int, default=0, help="seed of the --grow-vocab draws")
  convert.set_defaults(func=_run_convert)

  from omnijax.data import cli as data_cli  # argparse only; heavy imports stay in the handlers
  data_cli.register(commands)
  from omnijax import golden, scaling
  golden.register(commands)
  scaling.register(commands)
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
