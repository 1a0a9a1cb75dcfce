"""Paths that may be local or remote (`gs://bucket/run`), and writing files so that readers see
the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import pathlib
import shutil
import socket
import stat
import tempfile
from typing import Callable, Iterator

from etils import epath

log = logging.getLogger(__name__)


def is_remote(path: str | os.PathLike) -> bool:
  """gs://, s3:// and other object-store URLs (read and written through etils.epath)."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """An absolute local path, or the remote URL exactly as given (never made 'absolute'
  against the working directory, which would turn gs://b/run into ./gs:/b/run)."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.fspath(path)))


class NotRegularFileError(OSError):
  """A path that should be a file is a directory, a device, a FIFO or a socket."""

  def __str__(self) -> str:
    return f"{self.filename}: {self.strerror}"


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: str | os.PathLike) -> None:
  """Raises NotRegularFileError when `path` (links followed) exists but is not a regular file:
  reading a device such as /dev/zero never ends and opening a FIFO waits for a writer. A missing
  path passes: the caller's open says it is missing."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    return
  if not stat.S_ISREG(mode):
    kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
    raise NotRegularFileError(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> None:
  """`write(tmp_path)` into a temporary file, then put it in place of `target` at once: a rename
  beside a local target; one upload for a remote one (object stores replace whole objects)."""
  if is_remote(target):
    with tempfile.TemporaryDirectory() as tmp_dir:
      tmp = os.path.join(tmp_dir, "upload")
      write(tmp)
      epath.Path(os.fspath(target)).write_bytes(pathlib.Path(tmp).read_bytes())
    return
  target = pathlib.Path(target)
  if target.is_dir():  # the rename would fail naming the temporary file, not the target
    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    # mkstemp's 0o600 would become the target's mode: keep the replaced file's mode, or give a
    # new file the mode a plain open() would (0o666 less the umask).
    os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask())
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
  atomic_write(target, lambda tmp: pathlib.Path(tmp).write_text(text))


def staging_dir(target: str | os.PathLike) -> pathlib.Path:
  """A fresh empty directory beside `target` (same filesystem, so `replace_dir` is a rename)."""
  target = pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  staged = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".partial"))
  staged.chmod(0o755)  # mkdtemp's 0o700 would otherwise become the target's mode
  return staged


_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h): swap two paths atomically
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swaps two directories in one atomic step where the OS can (Linux >= 3.15, glibc >= 2.28)."""
  renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
  if renameat2 is None:
    return False
  return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(staged: str | os.PathLike, target: str | os.PathLike) -> None:
  """Moves the complete directory `staged` to `target`, replacing what `target` held.

  Readers see the old directory or the new one, never a mix: a new target appears by one rename,
  an existing one is swapped with the staged one in one rename (renameat2 RENAME_EXCHANGE) and the
  old content then removed. Where the OS cannot swap, the old directory is moved aside first, so a
  crash between the two renames leaves it whole under `.<name>.replaced-*`.
  """
  staged, target = pathlib.Path(staged), pathlib.Path(target)
  if not target.exists():
    os.rename(staged, target)
    return
  if _exchange(staged, target):
    shutil.rmtree(staged)  # now holds the old content
    return
  aside = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".replaced"))
  os.rename(target, aside / target.name)
  os.rename(staged, target)
  shutil.rmtree(aside)


class LockHeldError(RuntimeError):
  """Another process holds an advisory lock; the message is what it wrote there (its pid and
  host)."""


def hold_lock(path: str | os.PathLike) -> int:
  """Takes an advisory `flock` on `path` (created if needed) and writes this process's pid and
  host into it; returns the descriptor holding it. Closing the descriptor releases the lock,
  and so does the process ending, however it ends: a dead holder never leaves it stuck. Raises
  LockHeldError naming the holder. A filesystem without locks (some network mounts) gets a
  warning and no guard."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
    os.close(fd)
    raise LockHeldError(holder) from None
  except OSError as e:
    log.warning("cannot lock %s (%s); make sure no other process writes there", path,
                e.strerror or e)
  os.ftruncate(fd, 0)
  os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
  return fd


class OutputBusyError(RuntimeError):
  """Another command is writing the same output."""


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, command: str) -> Iterator[None]:
  """Holds the output `target` (a file or a directory) for this process while `with` runs, so a
  second command writing it at the same time is refused (OutputBusyError naming the holder)
  instead of silently replacing the first one's result. The lock is the hidden file
  `.NAME.lock` beside the target, removed on release while still held; a process killed
  meanwhile leaves it unlocked, and the next writer takes it. Object stores have no locks: a
  remote target is not guarded."""
  if is_remote(target):
    yield
    return
  target = pathlib.Path(os.path.abspath(target))
  target.parent.mkdir(parents=True, exist_ok=True)
  path = target.parent / f".{target.name}.lock"
  while True:
    try:
      fd = hold_lock(path)
    except LockHeldError as e:
      raise OutputBusyError(f"{target} is being written by another `omnijax {command}` ({e}); "
                            "wait for it to finish or choose another output") from None
    if _still_at(fd, path):
      break
    os.close(fd)  # its holder removed it as we took it: take the file now at `path`
  try:
    yield
  finally:
    path.unlink(missing_ok=True)  # before the lock goes: a waiter then finds no file, or a new one
    os.close(fd)


def _still_at(fd: int, path: pathlib.Path) -> bool:
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except FileNotFoundError:
    return False
