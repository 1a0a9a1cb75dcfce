"""The `omnijax` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import threading


def _quiet_libtpu_off_tpu() -> None:
  # libtpu (installed for AOT compilation) probes GCE metadata at import and warns loudly on
  # machines that are not TPU VMs; TPU VMs expose /dev/accel* or vfio devices.
  if not (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")):
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu's lock file guards chips against a second process; without chips there is none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Off a TPU VM libtpu cannot find the host's accelerator type and says so on every load;
    # compile-only use describes its topology explicitly (topology.*), so any valid type does.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")


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
  from omnijax.aot import compile_train_step
  from omnijax.config import load_config

  overrides = list(args.overrides)
  if args.topology:
    overrides.append(f"topology.name={args.topology}")
  report, _ = compile_train_step(load_config(args.config, overrides), stage=args.stage)
  print(report.describe())
  return 0


def _run_convert(args) -> int:
  from omnijax.convert import run_convert
  return run_convert(args)


def _add_global_args(parser: argparse.ArgumentParser, top_level: bool) -> None:
  parser.add_argument("--host-devices", type=int,
                      default=None if top_level else argparse.SUPPRESS,
                      help="force N host (CPU) devices, e.g. 8 to inspect an 8-way mesh on a CPU")
  parser.add_argument("--debug", action="store_true",
                      default=False if top_level else argparse.SUPPRESS,
                      help="show the full traceback of an error")


def _accept_global_args_everywhere(parser: argparse.ArgumentParser) -> None:
  """`omnijax train ... --debug` works like `omnijax --debug train ...` (SUPPRESS keeps a value
  given before the subcommand)."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for subparser in action.choices.values():
        _add_global_args(subparser, top_level=False)
        _accept_global_args_everywhere(subparser)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="omnijax", description=__doc__)
  _add_global_args(parser, top_level=True)
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
  compile_.set_defaults(func=_run_compile)

  convert = commands.add_parser("convert", help="Hugging Face safetensors <-> omnijax weights")
  convert.add_argument("direction", choices=["from-hf", "to-hf"])
  convert.add_argument("source", help="HF directory (from-hf) or omnijax checkpoint dir (to-hf)")
  convert.add_argument("dest", help="omnijax checkpoint dir (from-hf) or HF directory (to-hf)")
  convert.add_argument("--vocab", default=None,
                       help="token layout when config.json has none: omni_diffusion or "
                            "compact:TEXT,IMAGE_CODES,SPEECH_CODES")
  convert.add_argument("--dtype", default="float32", help="export dtype (to-hf)")
  convert.add_argument("--force", action="store_true",
                       help="from-hf: replace an existing omnijax model directory")
  convert.set_defaults(func=_run_convert)

  from omnijax.data import cli as data_cli  # argparse only; heavy imports stay in the handlers
  data_cli.register(commands)
  _accept_global_args_everywhere(parser)
  return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Like parse_args, but `key=value` overrides may also come after options (`--max-steps 3
  model.num_layers=4`), as people type them."""
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  misplaced = [item for item in extra if "=" in item and not item.startswith("-")]
  unknown = [item for item in extra if item not in misplaced]
  if unknown or (misplaced and not hasattr(args, "overrides")):
    parser.error(f"unrecognized arguments: {' '.join(unknown or misplaced)}")
  if misplaced:
    args.overrides = list(args.overrides) + misplaced
  return args


def describe_error(error: BaseException) -> str:
  """One line saying what went wrong and where: the file for OS errors (a full disk, a read-only
  directory), the message itself for omnijax's own errors, which name the file, record or key."""
  if isinstance(error, OSError) and error.strerror:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror}"
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  if type(error).__module__.startswith("omnijax"):
    return text
  return f"{type(error).__name__}: {text} (unexpected; --debug shows where)"


class _DropClosedLoopTracebacks(io.TextIOBase):
  """stderr without the tracebacks of 'RuntimeError: Event loop is closed'.

  After a failed background checkpoint save, tensorstore writes still in flight complete into
  Orbax's closed event loop, and their callbacks print tracebacks from C++ threads (past
  sys.excepthook). The failure itself is raised again in the main thread and reported there in
  one line, which those tracebacks would bury. Text is held per thread from 'Traceback' to the
  exception line, then dropped or written.
  """

  NOISE = "RuntimeError: Event loop is closed"

  def __init__(self, stream):
    self._stream = stream
    self._held: dict[int, str] = {}

  def write(self, text: str) -> int:
    thread = threading.get_ident()
    held = self._held.get(thread, "")
    if not held and not text.startswith("Traceback (most recent call last)"):
      return self._stream.write(text)
    held += text
    last_line = held.rstrip("\n").rsplit("\n", 1)[-1]
    if held.endswith("\n") and last_line and not last_line.startswith(" ") and \
        not last_line.startswith("Traceback"):
      self._held.pop(thread, None)
      if last_line.strip() != self.NOISE:
        self._stream.write(held)
    else:
      self._held[thread] = held
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def fileno(self) -> int:
    return self._stream.fileno()


def _quiet_background_failures() -> None:
  """A failed background checkpoint save is reported once, in one line, by the main thread."""
  # Orbax logs the failure with its traceback before raising it in the main thread.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  sys.stderr = _DropClosedLoopTracebacks(sys.stderr)


def _exit_now(status: int) -> None:
  """Ends the process without waiting for non-daemon threads (Orbax's, after a failed save)
  that would otherwise hold it, and a pod's machines, forever."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def main(argv: list[str] | None = None) -> int:
  """The `omnijax` command. Errors print one line on stderr (the traceback with --debug); from
  the command line (argv None) a failure ends the process at once."""
  args = parse_args(argv)
  _quiet_libtpu_off_tpu()
  if args.host_devices is not None:
    if args.host_devices < 1:
      print(f"omnijax: --host-devices {args.host_devices}: expected a number of devices >= 1",
            file=sys.stderr)
      return 2
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.host_devices}")
  if not args.debug and argv is None:
    _quiet_background_failures()
  from omnijax.config import ConfigError
  try:
    status = args.func(args)
  except Exception as e:
    if args.debug:
      raise
    status = 2 if isinstance(e, ConfigError) else 1
    kind = "config error: " if isinstance(e, ConfigError) else ""
    print(f"omnijax {args.command}: {kind}{describe_error(e)}", file=sys.stderr)
  if status and argv is None:
    _exit_now(status)
  return status


if __name__ == "__main__":
  sys.exit(main())
