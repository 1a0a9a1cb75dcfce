"""Training metrics: metrics.jsonl, TensorBoard events, a progress bar and loss-curve PNGs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import tqdm
from etils import epath
from tensorboardX import SummaryWriter

from omnijax.data.tasks import TASKS
from omnijax.files import atomic_write, atomic_write_text, is_remote, resolve

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curves.png"


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  path = resolve(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
  """Appends one JSON object per logged step; after a resume, entries past the restored step
  (written before the crash and about to be recomputed) are dropped, so each step appears once.
  Only the primary process writes (`enabled`). Object stores cannot append, so a remote
  workdir's metrics.jsonl is rewritten whole at each log."""

  def __init__(self, workdir: str | os.PathLike, resume_step: int, total_steps: int,
               enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self.workdir = resolve(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._path = self.workdir / METRICS_FILE
    self._lines = [json.dumps(m) + "\n" for m in read_metrics(self.workdir)
                   if m["step"] <= resume_step]
    atomic_write_text(self._path, "".join(self._lines))
    self._file = None if is_remote(self._path) else open(self._path, "a")
    self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))
    self._progress = tqdm.tqdm(total=total_steps, initial=resume_step, unit="step",
                               dynamic_ncols=True, disable=None)

  def log(self, record: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps(record) + "\n"
    if self._file is None:
      self._lines.append(line)
      atomic_write_text(self._path, "".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()
    step = record["step"]
    for key, value in record.items():
      if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
        self._tensorboard.add_scalar(key.replace("loss_", "loss/"), value, step)
    self._progress.set_postfix(stage=record["stage"], loss=f"{record['loss']:.3f}",
                               refresh=False)

  def advance(self, steps: int = 1) -> None:
    if self.enabled:
      self._progress.update(steps)

  def close(self) -> None:
    if not self.enabled:
      return
    self._progress.close()
    self._tensorboard.close()
    if self._file is not None:
      self._file.close()


def step_record(step: int, stage: str, metrics: dict, tokens_per_s: float, mfu: float) -> dict:
  """Host metrics dict -> the JSON record of one step (per-task losses only where seen)."""
  record = {"step": step, "stage": stage, "loss": float(metrics["loss"]),
            "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
            "targets": int(metrics["targets"]), "tokens_per_s": tokens_per_s, "mfu": mfu}
  task_loss, task_targets = np.asarray(metrics["task_loss"]), np.asarray(metrics["task_targets"])
  for index, task in enumerate(TASKS):
    if task_targets[index] > 0:
      record[f"loss_{task}"] = float(task_loss[index])
  return record


def plot_loss_curves(workdir: str | os.PathLike) -> epath.Path | None:
  """One panel per stage: total and per-task loss against the global step."""
  import matplotlib

  matplotlib.use("Agg")  # files only; no display on training hosts
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  if not records:
    return None
  stages = list(dict.fromkeys(r["stage"] for r in records))
  figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 4), squeeze=False)
  for axis, stage in zip(axes[0], stages):
    rows = [r for r in records if r["stage"] == stage]
    steps = [r["step"] for r in rows]
    axis.plot(steps, [r["loss"] for r in rows], color="black", linewidth=2, label="loss")
    for task in TASKS:
      points = [(r["step"], r[f"loss_{task}"]) for r in rows if f"loss_{task}" in r]
      if points:
        axis.plot(*zip(*points), linewidth=1, label=task)
    axis.set_title(stage)
    axis.set_xlabel("step")
    axis.set_ylabel("masked-token cross-entropy")
    axis.legend(fontsize=7)
  figure.tight_layout()
  path = resolve(workdir) / PLOT_FILE
  atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
  plt.close(figure)
  return path
