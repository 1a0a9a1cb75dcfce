"""Writing files so that readers see the old version or the new one, never half of one."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> None:
  """`write(tmp_path)` into a temporary file beside `target`, then rename it over `target`."""
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
