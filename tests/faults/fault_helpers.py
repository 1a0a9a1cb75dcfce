"""Tools of the fault-injection suite: the real `omnijax` command in a subprocess, one-line error
checks, and snapshots of directories that prove a failure changed nothing."""

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_EXPERIMENT = REPO / "tests" / "train" / "tiny_experiment.yaml"
# Fault checks never need more devices than the tiny model's mesh; fewer compile faster.
DEVICES = "--xla_force_host_platform_device_count=2"


# YAML whose last anchor expands to 10**9 values (a "billion laughs" bomb), to put before a key.
ALIAS_BOMB = ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
              + "".join(f"{b}: &{b} [{', '.join(['*' + a] * 10)}]\n"
                        for a, b in zip("abcdefgh", "bcdefghi")))


# Runs `python -m omnijax.cli ARGV` with writes past a file size failing (EFBIG), as writes to
# a full disk fail (ENOSPC): the limit and an ignored SIGXFSZ survive exec.
_WITH_FILE_SIZE_LIMIT = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'omnijax.cli', *sys.argv[2:]])")


def omnijax(*args, timeout=120, env=None, cwd=None, file_size_limit=None,
            wait=True) -> subprocess.CompletedProcess | subprocess.Popen:
  """Runs `python -m omnijax.cli ARGS` as a user would; `timeout` turns a hang into a failure."""
  environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(REPO), os.environ.get("PYTHONPATH", "")]), "XLA_FLAGS": DEVICES, **(env or {})}
  command = [sys.executable, "-m", "omnijax.cli", *map(str, args)]
  if file_size_limit is not None:
    command = [sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, str(file_size_limit),
               *map(str, args)]
  if not wait:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment, cwd=cwd)
  return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                        env=environment, cwd=cwd)


def train_args(workdir, data_dir, *extra):
  return ("train", "--config", TINY_EXPERIMENT, "--workdir", workdir, f"data.dir={data_dir}",
          *extra)


def assert_refused(result, status: int, pattern: str) -> str:
  """Exit `status`, no traceback anywhere, and exactly one line on stderr matching `pattern`."""
  output = result.stdout + result.stderr
  assert result.returncode == status, f"exit {result.returncode}, expected {status}:\n{output}"
  assert "Traceback" not in output, output
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
  assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
  return lines[0]


def _fingerprint(path: pathlib.Path) -> str:
  """A file's content hash; what a link points to (a link to /dev/zero is never read); 'dir' or
  'special' (a FIFO, whose reader would wait for a writer) for the rest."""
  if path.is_symlink():
    return f"link to {os.readlink(path)}"
  if path.is_dir():
    return "dir"
  return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "special"


def snapshot(root, ignore=("lock",)) -> dict[str, str]:
  """Relative path -> fingerprint (content hash, 'dir', ...) of everything under `root`, except
  the `ignore`d names (a workdir's lock file records who last held it)."""
  root = pathlib.Path(root)
  if not root.exists():
    return {}
  if root.is_file():
    return {".": _fingerprint(root)}
  return {str(path.relative_to(root)): _fingerprint(path)
          for path in sorted(root.rglob("*")) if path.name not in ignore}


def copy_tree(source, target) -> pathlib.Path:
  shutil.copytree(source, target)
  return pathlib.Path(target)


def make_read_only(path: pathlib.Path) -> None:
  """Makes a directory unwritable, for root too (chmod alone does not stop root)."""
  path.chmod(0o555)
  probe = path / ".probe"
  try:
    probe.touch()
  except PermissionError:
    return
  probe.unlink()
  if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)]).returncode == 0:
    return
  pytest.skip("cannot make a directory read-only for this user (root without chattr)")


def undo_read_only(path: pathlib.Path) -> None:
  if shutil.which("chattr"):
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
  path.chmod(0o755)
