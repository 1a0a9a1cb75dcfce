"""The `omnijax` command: one entry point, one subcommand per job.

Each area registers its own subcommands (`register(subparsers)` in its `cli` module) and keeps
heavy imports inside the handlers, so `omnijax --help` stays fast. The global options set up
the process (omnijax.processes.initialize) before any subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import sys
import threading

# The modules whose `register(subparsers)` add subcommands, in `omnijax --help` order (eval
# after train: it extends `train` with the main job's evaluation).
COMMAND_AREAS = ("omnijax.train.cli", "omnijax.weights.cli", "omnijax.data.cli",
                 "omnijax.generate.cli", "omnijax.eval.cli", "omnijax.podfit.cli")


def _add_global_args(parser: argparse.ArgumentParser, top_level: bool) -> None:
  """The options of the whole command. Subcommands accept them too, with SUPPRESS defaults so a
  value given before the subcommand is kept."""
  default = lambda value: value if top_level else argparse.SUPPRESS
  parser.add_argument("--host-devices", type=int, default=default(None),
                      help="force N host (CPU) devices, e.g. 8 to inspect an 8-way mesh on a CPU")
  parser.add_argument("--debug", action="store_true", default=default(False),
                      help="show the full traceback of an error")
  processes = parser.add_argument_group(
      "multi-process jobs (all three, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
      "JAX_PROCESS_ID; TPU VM slices need none of them)")
  processes.add_argument("--coordinator", default=default(None), metavar="HOST:PORT",
                         help="address of process 0's coordination service")
  processes.add_argument("--num-processes", type=int, default=default(None), metavar="N")
  processes.add_argument("--process-id", type=int, default=default(None), metavar="I")


def _accept_global_args_everywhere(parser: argparse.ArgumentParser) -> None:
  """`omnijax train ... --debug` works like `omnijax --debug train ...`."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for subparser in action.choices.values():
        _add_global_args(subparser, top_level=False)
        _accept_global_args_everywhere(subparser)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="omnijax", description=__doc__.split("\n")[0])
  _add_global_args(parser, top_level=True)
  commands = parser.add_subparsers(dest="command", required=True)
  for area in COMMAND_AREAS:
    importlib.import_module(area).register(commands)
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


ERROR_LIMIT = 1000  # characters of an error line, at most


def describe_error(error: BaseException) -> str:
  """One line saying what went wrong and where: the file for OS errors (a full disk, a read-only
  directory), the message itself for omnijax's own errors, which name the file, record or key."""
  from omnijax.messages import clip

  if isinstance(error, OSError) and error.strerror:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror}"
  # omnijax's messages quote values cut short; others may quote anything, however long.
  text = clip(str(error).strip().splitlines()[0], ERROR_LIMIT) if str(error).strip() else ""
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
  # Orbax logs the failure with its traceback before raising it in the main thread, and its
  # write tasks' exceptions reach asyncio's "Task exception was never retrieved" when they are
  # collected (timing-dependent); warnings still show.
  for logger in ("absl", "asyncio"):
    logging.getLogger(logger).addFilter(lambda record: record.levelno < logging.ERROR)
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
  if args.host_devices is not None and args.host_devices < 1:
    print(f"omnijax: --host-devices {args.host_devices}: expected a number of devices >= 1",
          file=sys.stderr)
    return 2
  if not args.debug and argv is None:
    _quiet_background_failures()
  from omnijax import processes
  from omnijax.config import ConfigError
  try:
    processes.initialize(host_devices=args.host_devices, coordinator=args.coordinator,
                       num_processes=args.num_processes, process_id=args.process_id,
                       distributed=getattr(args, "distributed", False))
    status = args.func(args)
  except KeyboardInterrupt:
    if args.debug:
      raise
    print(f"omnijax {args.command}: interrupted", file=sys.stderr)
    status = 130
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
