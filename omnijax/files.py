"""Paths that may be local or remote (`gs://bucket/run`), and writing files so that readers see
the old version or the new one, never half of one."""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import tempfile
from typing import Callable

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """gs://, s3:// and other object-store URLs (read and written through etils.epath)."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """An absolute local path, or the remote URL exactly as given (never made 'absolute'
  against the working directory, which would turn gs://b/run into ./gs:/b/run)."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.fspath(path)))


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
