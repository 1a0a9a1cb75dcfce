"""Training checkpoints: model, optimizer, step, stage and data-iterator state, saved together.

Orbax writes every checkpoint into a temporary directory and renames it only once complete, so
a crash or `kill -9` mid-save leaves the previous checkpoint as the latest. Saves are
asynchronous (training continues while tensors are written). A checkpoint that cannot be read
(truncated files) is skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from omnijax.config import ConfigError
from omnijax.files import resolve
from omnijax.sharding import path_str

log = logging.getLogger(__name__)


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in the directory could be restored."""


class CheckpointMismatchError(ConfigError):
  """A checkpoint holds parameters of other shapes or dtypes than the config describes."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (the directory is a file, read-only, or the disk full)."""


def _root_cause(error: BaseException) -> BaseException:
  """The innermost exception of a chain (Orbax wraps the OSError that says what went wrong)."""
  seen = {id(error)}
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
    if id(error) in seen:
      break
    seen.add(id(error))
  return error


def check_writable(directory: epath.Path) -> None:
  """Creates `directory` and proves a file can be written in it, before any step is spent."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".omnijax-write-probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise CheckpointSaveError(f"cannot write checkpoints to {directory}: "
                              f"{e.strerror or e}") from None


class Checkpoints:
  def __init__(self, directory: str | os.PathLike, keep: int | None, read_only: bool = False):
    """`keep` None keeps every checkpoint; `read_only` reads a run's checkpoints without
    creating or renaming anything (e.g. for generation)."""
    self.directory = resolve(directory)  # local or gs://
    self.read_only = read_only
    if not read_only and ocp.multihost.is_primary_host(0):
      check_writable(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=not read_only),
        item_names=("state", "data", "meta"))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _save_failed(self, error: Exception) -> CheckpointSaveError:
    """One line saying which file could not be written and why (the OS error, not the stack)."""
    cause = _root_cause(error)
    if isinstance(cause, OSError) and cause.strerror:
      where, detail = cause.filename or self.directory, cause.strerror
    else:
      # tensorstore reports OS errors inside a ValueError: 'Failed writing: "FILE": ...
      # [os_error_code='28']'.
      text = str(cause)
      file = re.search(r'Failed writing: "([^"]+)"', text)
      code = re.search(r"os_error_code='(\d+)'", text)
      where = file.group(1) if file else self.directory
      detail = os.strerror(int(code.group(1))) if code else text.splitlines()[0][:300]
    return CheckpointSaveError(f"saving a checkpoint failed: {where}: {detail}; the checkpoints "
                               f"already in {self.directory} were kept")

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts an asynchronous save; the caller must have checked that `state` is finite.

    Raises CheckpointSaveError if this save cannot start or the previous one failed.
    """
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:
      raise self._save_failed(e) from e

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def check_params_fit(self, step: int, params) -> None:
    """Raises CheckpointMismatchError naming the first parameter whose shape or dtype in
    checkpoint `step` differs from the abstract `params` (the config's): a config that does not
    describe the checkpoint is never reported as unreadable files. Only the checkpoint's metadata
    is read; when that fails, restoring says the checkpoint is unreadable."""
    try:
      stored = ocp.PyTreeCheckpointHandler().metadata(
          self.directory / str(step) / "state").tree["params"]
    except Exception:  # noqa: BLE001 -- damaged metadata: the restore reports it
      return
    described = lambda tree: {path_str(path): (tuple(leaf.shape), str(leaf.dtype))
                              for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    found, wanted = described(stored), described(params)
    for name in sorted(set(found) | set(wanted)):
      if found.get(name) != wanted.get(name):
        show = lambda entry: "absent" if entry is None else f"{entry[0]} {entry[1]}"
        raise CheckpointMismatchError(
            f"the checkpoint {self.directory}/{step} holds parameter {name} as "
            f"{show(found.get(name))}, the config describes {show(wanted.get(name))}")

  def restore(self, step: int, target_for_meta,
              params_only: bool = False) -> tuple[int, Any, dict, dict]:
    """(step, state, data_state, meta) of checkpoint `step`; see `restore_latest`."""
    if step not in self.steps():
      raise CheckpointRestoreError(f"no checkpoint at step {step} in {self.directory} (it has "
                                   f"{', '.join(map(str, self.steps())) or 'none'})")
    try:
      meta = self.read_meta(step)
    except Exception as e:  # truncated or missing JSON
      raise CheckpointRestoreError(f"checkpoint {self.directory}/{step} is unreadable: "
                                   f"{type(e).__name__}: {str(e)[:200]}") from None
    target = target_for_meta(meta)  # its errors (config vs checkpoint) propagate as they are
    self.check_params_fit(step, target if params_only else target.params)
    try:
      return self._restore(step, meta, target, params_only)
    except Exception as e:  # truncated files fail in tensorstore, zarr or json layers
      raise CheckpointRestoreError(f"checkpoint {self.directory}/{step} is unreadable: "
                                   f"{type(e).__name__}: {str(e)[:200]}") from None

  def _restore(self, step: int, meta: dict, target,
               params_only: bool) -> tuple[int, Any, dict | None, dict]:
    if params_only:  # the parameters alone (e.g. for generation): no optimizer state in memory
      target = {"params": target}
      restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target))))
      return step, restored["state"], None, meta
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return step, restored["state"], restored["data"], meta

  def restore_latest(self, target_for_meta,
                     params_only: bool = False) -> tuple[int, Any, dict | None, dict] | None:
    """(step, state, data_state, meta) of the newest readable checkpoint, or None if none exist.

    `target_for_meta(meta)` returns the abstract state (ShapeDtypeStructs with the shardings to
    restore onto, possibly another mesh) for the checkpoint described by `meta`; errors it raises
    (a config that no longer matches the checkpoint) propagate: only checkpoints whose files
    cannot be read are skipped. With `params_only`, the target is the abstract parameters
    and the result's state is {"params": ...} (no data state).
    """
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # truncated or missing JSON
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
        continue
      target = target_for_meta(meta)
      self.check_params_fit(step, target if params_only else target.params)
      try:
        restored = self._restore(step, meta, target, params_only)
      except Exception as e:  # a truncated array fails in tensorstore, zarr or json layers
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
        log.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                    self.directory, step, errors[-1])
        continue
      if errors:
        log.warning("restored checkpoint %d instead of newer unreadable ones: %s", step,
                    "; ".join(errors))
        if not self.read_only:
          self._set_aside([s for s in steps if s > step])
      return restored
    if steps:
      raise CheckpointRestoreError(f"no readable checkpoint in {self.directory}: "
                                   + "; ".join(errors))
    return None

  def _set_aside(self, unreadable: list[int]) -> None:
    """Renames unreadable checkpoints (kept for inspection, never deleted) so that training
    can write those steps again."""
    # Orbax's own process agreement (this module sits below the process group, omnijax.processes).
    if ocp.multihost.is_primary_host(0):
      for step in unreadable:
        target = self.directory / f"{step}.unreadable.{int(time.time())}"
        (self.directory / str(step)).rename(target)
        log.warning("moved unreadable checkpoint %d to %s", step, target)
    ocp.multihost.sync_global_processes("omnijax-checkpoints-set-aside")
    self._manager.reload()

  def close(self) -> None:
    """Waits for the last save; raises CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(e) from e
    finally:
      self._manager.close()

