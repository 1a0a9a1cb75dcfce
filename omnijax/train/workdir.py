"""Guarding a training workdir: one run at a time, and only the run its checkpoints belong to.

`WorkdirLock` is an advisory `flock` on `<workdir>/lock`, held by process 0 of a run for as long
as it trains: the kernel releases it when the process ends, however it ends, so a run that died
never leaves it stuck. The other processes of a multi-host run share the workdir under process 0's
lock; the loop makes every process of a second run refuse when its process 0 is refused. Object
stores (gs://) have no locks: a workdir there is not guarded (a warning says so).

`check_same_run` compares a config with the one the run wrote into `<workdir>/config.yaml` when
the workdir holds checkpoints, before anything is written: keys that change what is computed must
match; keys that only say how or where it runs may change (see RESUMABLE_CHANGES).
"""

from __future__ import annotations

import logging
import os
import pathlib

import yaml

from omnijax.config import Config, ConfigError, load_yaml, to_dict
from omnijax.files import LockHeldError, hold_lock, is_remote, resolve

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
# Dotted keys (or sections, ending in '.') a resumed run may change: the mesh and hardware, how
# often it logs and saves, how fast data arrives, how attention is computed and rematerialised.
RESUMABLE_CHANGES = ("mesh.", "topology.", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.log_every", "train.peak_flops_per_device", "train.init_from",
                     "data.num_workers", "data.worker_buffer_size", "toyworld.",
                     "model.attention", "model.remat")


class WorkdirBusyError(RuntimeError):
  """Another training run holds the workdir."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this run or raises WorkdirBusyError."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = os.fspath(workdir)
    self.remote = is_remote(self.workdir)
    self.path = pathlib.Path(self.workdir) / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> None:
    if self.remote:
      log.warning("%s is in an object store, which has no locks: make sure no other run uses it",
                  self.workdir)
      return
    try:
      self._fd = hold_lock(self.path)
    except LockHeldError as e:
      raise WorkdirBusyError(f"{self.workdir} is in use by another `omnijax train` ({e}); wait "
                             "for it to finish or use another --workdir") from None

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _flatten(tree, prefix: str = "") -> dict:
  """Nested mappings -> {dotted key: value}."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def _show(value) -> str:
  return "(absent)" if value is None else str(value)


def config_differences(run: dict, now: dict) -> list[str]:
  """`key: X in the run, Y now` for every key that differs and may not change on resume."""
  run, now = _flatten(run), _flatten(now)
  return [f"{key}: {_show(run.get(key))} in the run, {_show(now.get(key))} now"
          for key in sorted(set(run) | set(now))
          if run.get(key) != now.get(key)
          and not (key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_CHANGES))]


def _has_checkpoints(workdir) -> bool:
  directory = workdir / CHECKPOINTS_DIR
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def config_text(config: Config) -> str:
  return yaml.safe_dump(to_dict(config), sort_keys=False)


def check_same_run(workdir: str | os.PathLike, config: Config) -> None:
  """Refuses `config` if `workdir`'s checkpoints were written under a config that differs in a
  key that changes what is computed (model shape or dtype, data, objective, optimizer, stages)."""
  workdir = resolve(workdir)  # local or gs://
  path = workdir / CONFIG_FILE
  if not path.is_file() or not _has_checkpoints(workdir):
    return  # nothing to resume: the config may change freely
  try:
    run = load_yaml(path.read_text(), str(path))
  except (OSError, ConfigError, UnicodeDecodeError) as e:
    raise ConfigError(f"cannot read the config of the run in {workdir} ({e}); it describes the "
                      "checkpoints there: restore it or use another --workdir") from None
  differences = config_differences(run, yaml.safe_load(config_text(config)))
  if differences:
    shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more"
                                          if len(differences) > 5 else "")
    raise ConfigError(f"{workdir} holds checkpoints of a run with another config ({shown}); "
                      f"resume with the run's config ({path}) or use another --workdir")
