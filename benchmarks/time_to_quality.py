"""Time to quality: each task's validation quality against training seconds and tokens, for the
shipped recipe and for each ablated lever, one training run each.

Each `--run NAME[:key=value,key=value,...]` trains the config with those overrides through
`omnijax train` (into OUT/runs/NAME, a checkpoint kept every `--eval-every` steps), then every
kept checkpoint at a multiple of `--eval-every` and the last one is evaluated on the
validation split by `omnijax eval`'s own code (omnijax.eval.evaluate.evaluate). A comma starts
a new override only where what follows it reads `key=`, so values may hold commas
(`data.mixture={t2i: 1, caption: 1}`). `--existing NAME=WORKDIR` evaluates a run trained
before (e.g. the main job) without training it again.

The time axis is training seconds read back from the run's metrics.jsonl: each logged record
covers the steps since the one before at its `tokens_per_s`, so a window lasted
steps x global_batch_size x seq_len / tokens_per_s seconds (tokens: steps x batch x seq_len,
pads included). Evaluation is never in it (it runs after training), checkpoint saves are (the
main job saves too), and each stage's first window, which also compiles the stage's step, is
counted at the stage's median seconds per step; the excess is reported as compile seconds. A
run whose workdir OUT/runs/NAME exists resumes there (a finished one is only evaluated); the
window after such a restart still holds its compilation.

Writes OUT/time_to_quality.json (everything), .md (a summary ready for docs/benchmarks.md, then
each run's curve) and .png (one panel per task: quality against training seconds, one line per
run), and again after each run, so an interrupted benchmark keeps what it measured.

  python benchmarks/time_to_quality.py --out runs/ttq --eval-every 200 --run shipped \\
      --run "no_qk_norm:model.qk_norm=false" --existing main=runs/toy
  python benchmarks/time_to_quality.py --config tests/train/tiny_experiment.yaml --out /tmp/ttq \\
      --data /tmp/toyworld --eval-every 3 --samples 2 --run a:train.stages.stage1.steps=2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

import common  # noqa: F401  (the benchmarks' process environment, before jax starts)

import omnijax
from omnijax.config import load_config
from omnijax.files import atomic_write, atomic_write_text

# Training runs the same omnijax as the evaluation here (PYTHONPATH may point at a checkout).
CODE_ROOT = pathlib.Path(omnijax.__file__).resolve().parents[1]
DEFAULT_CONFIG = "tpu_configs/experiments/toy.yaml"
THRESHOLD = 0.9
OUTPUT_STEM = "time_to_quality"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
OVERRIDE_START = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_.]*\s*=")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  name: str
  overrides: tuple[str, ...] = ()  # train these over --config
  workdir: str | None = None  # or evaluate this existing workdir


def parse_run(text: str) -> RunSpec:
  """`NAME` or `NAME:key=value,key=value`: a run to train, its overrides over --config."""
  name, _, overrides = text.partition(":")
  check_run_name(name, f"--run {text!r}")
  return RunSpec(name, split_overrides(overrides, f"--run {text!r}"))


def split_overrides(text: str, where: str) -> tuple[str, ...]:
  """Comma-separated `key=value` overrides; a comma not followed by `key=` belongs to the value
  before it (a YAML list or mapping)."""
  if not text.strip():
    return ()
  pieces = text.split(",")
  if not OVERRIDE_START.match(pieces[0]):
    raise ValueError(f"{where}: {pieces[0].strip()!r} is not of the form key=value")
  overrides = [pieces[0]]
  for piece in pieces[1:]:
    if OVERRIDE_START.match(piece):
      overrides.append(piece)
    else:
      overrides[-1] += "," + piece
  return tuple(o.strip() for o in overrides)


def parse_existing(text: str) -> RunSpec:
  """`NAME=WORKDIR`: a run trained before, evaluated as it is."""
  name, equals, workdir = text.partition("=")
  check_run_name(name, f"--existing {text!r}")
  if not equals or not workdir:
    raise ValueError(f"--existing {text!r}: expected NAME=WORKDIR")
  return RunSpec(name, workdir=workdir)


def check_run_name(name: str, where: str) -> None:
  if not RUN_NAME.fullmatch(name):
    raise ValueError(f"{where}: the run name {name!r} must be letters, digits, '.', '_' or '-' "
                     "(it names the run's workdir)")


def _parse_args(argv=None):
  from omnijax.eval.evaluate import parse_steps, parse_tasks

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="the shipped recipe's YAML")
  parser.add_argument("--out", required=True, help="directory: runs/NAME workdirs, logs, results")
  parser.add_argument("--run", action="append", default=[], metavar="NAME[:key=value,...]",
                      help="a run to train: the config with these overrides (repeatable)")
  parser.add_argument("--existing", action="append", default=[], metavar="NAME=WORKDIR",
                      help="a run trained before, evaluated without training (repeatable)")
  parser.add_argument("--eval-every", type=int, required=True,
                      help="evaluate the checkpoint every N steps (and the last)")
  parser.add_argument("--samples", type=int, default=32, help="samples per task")
  parser.add_argument("--split", default="validation",
                      help="the split to evaluate on (recipes are chosen on validation)")
  parser.add_argument("--tasks", default="all", help="all, or a comma-separated list")
  parser.add_argument("--data", help="a shared toy world directory for every trained run "
                      "(generated by the first run if missing; default: the config's data.dir)")
  parser.add_argument("--eval-steps", default="", help="decode step counts, comma-separated, "
                      "besides each task's default (default: the task default only)")
  parser.add_argument("--batch-size", type=int, default=32, help="decode batch size")
  parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
  args = parser.parse_args(argv)
  try:
    if args.split == "heldout":
      raise ValueError("--split heldout: the held-out split is reported, never tuned on; "
                       "compare recipes on --split validation")
    runs = [parse_run(r) for r in args.run] + [parse_existing(e) for e in args.existing]
    if not runs:
      raise ValueError("no runs: give --run NAME[:key=value,...] or --existing NAME=WORKDIR")
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"run name {repeated[0]!r} is given twice")
    if args.eval_every < 1 or args.samples < 1 or args.batch_size < 1:
      raise ValueError("--eval-every, --samples and --batch-size must be >= 1")
    args.tasks = parse_tasks(args.tasks)
    args.eval_steps = parse_steps(args.eval_steps) if args.eval_steps.strip() else []
  except ValueError as e:
    parser.error(str(e))
  args.runs = runs
  return args


# --- the time axis --------------------------------------------------------------------------


def training_clock(records: list[dict], tokens_per_step: int) -> tuple[dict, dict]:
  """({step: (training seconds, training tokens)} at every logged step, {stage: compile
  seconds}) from metrics.jsonl records (see the module docstring)."""
  windows = []  # (step, stage, steps in the window, measured seconds, first of its stage)
  previous_step, previous_stage = 0, None
  for record in sorted(records, key=lambda r: r["step"]):
    steps = record["step"] - previous_step
    if steps < 1 or not record.get("tokens_per_s", 0) > 0:
      raise ValueError(f"metrics record at step {record['step']}: expected a step after "
                       f"{previous_step} and tokens_per_s > 0")
    windows.append((record["step"], record["stage"], steps,
                    steps * tokens_per_step / record["tokens_per_s"],
                    record["stage"] != previous_stage))
    previous_step, previous_stage = record["step"], record["stage"]
  steady = {}  # stage -> median seconds per step of its windows that compile nothing
  for stage in {w[1] for w in windows}:
    rates = [seconds / steps for _, s, steps, seconds, first in windows if s == stage and not first]
    if rates:
      steady[stage] = statistics.median(rates)
  clock, compile_seconds = {}, {}
  seconds = 0.0
  for step, stage, steps, measured, first in windows:
    if first and stage in steady:
      counted = min(measured, steps * steady[stage])
      compile_seconds[stage] = compile_seconds.get(stage, 0.0) + measured - counted
      measured = counted
    seconds += measured
    clock[step] = (seconds, step * tokens_per_step)
  return clock, compile_seconds


def first_reaching(points: list[dict], task: str, threshold: float = THRESHOLD) -> dict | None:
  """The first evaluated point (by step) where `task`'s quality at its default decode steps is
  >= threshold: {step, seconds, tokens, quality}, or None."""
  for point in sorted(points, key=lambda p: p["step"]):
    quality = default_quality(point, task)
    if quality is not None and quality >= threshold:
      return {"step": point["step"], "seconds": point["seconds"], "tokens": point["tokens"],
              "quality": quality}
  return None


def default_quality(point: dict, task: str) -> float | None:
  from omnijax.eval.evaluate import DEFAULT

  metrics = point["results"].get(task, {}).get(DEFAULT)
  return None if metrics is None else metrics["quality"]


def summarize(points: list[dict], tasks) -> dict:
  """Per task: the final quality, the first point reaching THRESHOLD and the chance baseline."""
  from omnijax.eval.evaluate import chance_quality

  last = max(points, key=lambda p: p["step"])
  return {task: {"final": default_quality(last, task),
                 "reached": first_reaching(points, task),
                 "chance": chance_quality(last["results"].get(task, {}))} for task in tasks}


# --- tables and the picture -----------------------------------------------------------------


def format_seconds(seconds: float) -> str:
  if seconds < 10:
    return f"{seconds:.1f} s"
  return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_summary(runs: dict, tasks) -> str:
  """Markdown: one row per run, each task's final quality and when it first reached 90 %."""
  lines = ["| run | steps | training time | tokens | " + " | ".join(tasks) + " |",
           "|---|---:|---:|---:|" + "---|" * len(tasks)]
  for name, run in runs.items():
    last = max(run["points"], key=lambda p: p["step"])
    cells = []
    for task in tasks:
      summary = run["summary"][task]
      final = "" if summary["final"] is None else f"{100 * summary['final']:.1f} %"
      reached = summary["reached"]
      cells.append(f"{final}, 90 % at {format_seconds(reached['seconds'])}" if reached
                   else f"{final}, 90 % not reached")
    lines.append(f"| {name} | {last['step']} | {format_seconds(last['seconds'])} | "
                 f"{last['tokens'] / 1e6:.2f} M | " + " | ".join(cells) + " |")
  # Chance is the same for every run: it comes from the data, not the model.
  chance = [next(iter(runs.values()))["summary"][task]["chance"] for task in tasks]
  if any(c is not None for c in chance):
    lines.append("| chance | | | | " + " | ".join("" if c is None else f"{100 * c:.1f} %"
                                                  for c in chance) + " |")
  return "\n".join(lines)


def format_curve(run: dict, tasks) -> str:
  """Markdown: one row per evaluated checkpoint, each task's quality at its default steps."""
  lines = ["| step | training time | tokens | " + " | ".join(tasks) + " |",
           "|---:|---:|---:|" + "---:|" * len(tasks)]
  for point in sorted(run["points"], key=lambda p: p["step"]):
    qualities = [default_quality(point, task) for task in tasks]
    lines.append(f"| {point['step']} | {format_seconds(point['seconds'])} | "
                 f"{point['tokens'] / 1e6:.2f} M | " +
                 " | ".join("" if q is None else f"{100 * q:.1f} %" for q in qualities) + " |")
  return "\n".join(lines)


def format_report(result: dict) -> str:
  meta, tasks = result["meta"], result["meta"]["tasks"]
  sections = [f"Validation quality ({meta['samples']} samples a task on the {meta['split']} "
              f"split, each task's default decode steps) of `{meta['config']}`; the time is "
              "training seconds (compilation and evaluation excluded, see "
              "benchmarks/time_to_quality.py). Each cell: the final quality, and the training "
              "time of the first evaluated checkpoint at >= 90 %.", "",
              format_summary(result["runs"], tasks)]
  for name, run in result["runs"].items():
    overrides = ", ".join(f"`{o}`" for o in run["overrides"]) or "none"
    source = f"existing workdir `{run['workdir']}`" if run["existing"] else f"overrides {overrides}"
    sections += ["", f"### {name} ({source})", "", format_curve(run, tasks)]
  return "\n".join(sections) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
  """One panel per task: quality at its default steps against training seconds, one line per
  run; dashed: 90 %, dotted: chance."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = result["meta"]["tasks"]
  columns = min(4, len(tasks))
  rows = -(-len(tasks) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False,
                              sharey=True)
  for axis, task in zip(axes.flat, tasks):
    for index, (name, run) in enumerate(result["runs"].items()):
      points = sorted(run["points"], key=lambda p: p["step"])
      axis.plot([p["seconds"] / 60 for p in points],
                        [100 * default_quality(p, task) for p in points], marker="o",
                        markersize=3, label=name, color=f"C{index}")
      chance = run["summary"][task]["chance"]
      if chance is not None and index == 0:
        axis.axhline(100 * chance, color="grey", linestyle=":", linewidth=1)
    axis.axhline(100 * THRESHOLD, color="black", linestyle="--", linewidth=0.8)
    axis.set_title(task)
    axis.set_xlabel("training minutes")
    axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
  for axis in axes[:, 0]:
    axis.set_ylabel("validation quality (%)")
  for axis in list(axes.flat)[len(tasks):]:
    axis.set_visible(False)
  axes.flat[0].legend(fontsize=7)
  figure.suptitle("validation quality at each task's default decode steps against training time"
                  " (dashed: 90 %, dotted: chance)", fontsize=9)
  figure.tight_layout()
  atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
  plt.close(figure)


# --- training and evaluating ----------------------------------------------------------------


def train_overrides(spec: RunSpec, args) -> list[str]:
  """The run's overrides, then what the benchmark needs: no evaluation after training, a
  checkpoint every --eval-every steps, none deleted, and the shared data."""
  total = sum(s.steps for s in load_config(args.config, spec.overrides).train.stages.values())
  forced = ["eval.after_training=false", f"train.checkpoint_every={args.eval_every}",
            f"train.keep_checkpoints={total}"]  # at most one checkpoint per step
  if args.data:
    forced += [f"data.dir={args.data}", f"toyworld.dir={args.data}"]
  return [*spec.overrides, *forced]


def train(spec: RunSpec, args, workdir: pathlib.Path) -> None:
  """`omnijax train` in a subprocess (the omnijax imported here); its output to
  OUT/logs/NAME.log."""
  log_path = pathlib.Path(args.out) / "logs" / f"{spec.name}.log"
  log_path.parent.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_ROOT),
                                                                  os.environ.get("PYTHONPATH")]))}
  command = [sys.executable, "-m", "omnijax.cli", "train", "--config", str(args.config),
             "--workdir", str(workdir), *train_overrides(spec, args)]
  print(f"{spec.name}: training ({' '.join(command[3:])}), log {log_path}", flush=True)
  with open(log_path, "w") as log:
    code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
  if code != 0:
    tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
    raise RuntimeError(f"run {spec.name}: omnijax train exited {code}: {tail[0]} "
                       f"(full log: {log_path})")


def evaluated_steps(workdir, eval_every: int) -> list[int]:
  """The kept checkpoints at multiples of eval_every, and the last one."""
  from omnijax.train.checkpoints import Checkpoints
  from omnijax.train.workdir import CHECKPOINTS_DIR

  checkpoints = Checkpoints(pathlib.Path(workdir) / CHECKPOINTS_DIR, keep=None, read_only=True)
  try:
    steps = checkpoints.steps()
  finally:
    checkpoints.close()
  if not steps:
    raise ValueError(f"{workdir}: no checkpoints")
  return sorted({s for s in steps if s % eval_every == 0} | {steps[-1]})


def evaluate_run(spec: RunSpec, workdir, args) -> dict:
  """Every evaluated checkpoint of a workdir on --split, with its training seconds and tokens."""
  from omnijax.eval.evaluate import evaluate
  from omnijax.generate.run import open_run
  from omnijax.train.metrics import read_metrics
  from omnijax.train.restore import read_run_config

  config = read_run_config(workdir)
  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  clock, compile_seconds = training_clock(read_metrics(workdir), tokens_per_step)
  points = []
  for step in evaluated_steps(workdir, args.eval_every):
    if step not in clock:
      raise ValueError(f"{workdir}: metrics.jsonl has no record at checkpoint step {step}")
    run, generator, split_dir = open_run(workdir, data_dir=args.data, split=args.split,
                                         batch_size=args.batch_size, step=step)
    results, _ = evaluate(generator, split_dir, args.tasks, args.eval_steps, limit=args.samples,
                          train_split=config.data.split)
    seconds, tokens = clock[step]
    points.append({"step": step, "seconds": seconds, "tokens": tokens, "results": results})
    print(f"{spec.name} step {step} ({format_seconds(seconds)}): " + ", ".join(
        f"{task} {100 * default_quality(points[-1], task):.1f} %" for task in args.tasks),
        flush=True)
  return {"workdir": str(workdir), "existing": spec.workdir is not None,
          "overrides": list(spec.overrides), "tokens_per_step": tokens_per_step,
          "compile_seconds": compile_seconds, "points": points,
          "summary": summarize(points, args.tasks)}


def write_outputs(result: dict, out: pathlib.Path) -> list[pathlib.Path]:
  paths = [out / f"{OUTPUT_STEM}.{suffix}" for suffix in ("json", "md", "png")]
  atomic_write_text(paths[0], json.dumps(result, indent=1) + "\n")
  atomic_write_text(paths[1], format_report(result))
  plot(result, paths[2])
  return paths


def main(argv=None) -> int:
  args = _parse_args(argv)
  out = pathlib.Path(args.out)
  try:
    for spec in args.runs:  # a bad override fails here, before anything trains
      if spec.workdir is None:
        train_overrides(spec, args)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": {"config": str(args.config), "split": args.split, "samples": args.samples,
                       "tasks": args.tasks, "eval_every": args.eval_every,
                       "eval_steps": args.eval_steps, "data": args.data, "threshold": THRESHOLD,
                       "time": "training seconds from metrics.jsonl; each stage's first window "
                               "at the stage's median seconds per step (compilation excluded); "
                               "evaluation excluded"},
              "runs": {}}
    for spec in args.runs:
      workdir = spec.workdir or out / "runs" / spec.name
      if spec.workdir is None:
        train(spec, args, workdir)
      result["runs"][spec.name] = evaluate_run(spec, workdir, args)
      paths = write_outputs(result, out)
    print(format_summary(result["runs"], args.tasks))
    print("wrote " + ", ".join(map(str, paths)))
    return 0
  except (ValueError, RuntimeError, OSError) as e:
    if args.debug:
      raise
    print(f"time_to_quality: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
