"""Paths that may be local or remote (`gs://bucket/run`), and writing files so that readers see
the old version or the new one, never half of one."""

from __future__ import annotations

import os
import pathlib
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
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
  atomic_write(target, lambda tmp: pathlib.Path(tmp).write_text(text))
