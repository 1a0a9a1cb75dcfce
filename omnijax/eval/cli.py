"""`omnijax eval`: a trained workdir's model on every task of a held-out split.

    omnijax eval --checkpoint runs/toy --split heldout --tasks all --steps 4,8,16,64 --out eval.json

Writes the JSON (results[task][steps], with each task's chance baseline from the training
split), every sample beside it (samples.jsonl for eval.json), a quality-vs-steps PNG (eval.png
for eval.json) and, when t2i or caption is evaluated on the toy world, a samples PNG
(eval_samples.png); prints the table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from omnijax.config import DECODERS
from omnijax.generate.cli import add_cache_flags


def register(subparsers) -> None:
  """Adds `eval`, and extends `train` (registered before) with the evaluation after the last
  stage that `eval.after_training` asks for."""
  train = subparsers.choices["train"]
  train.set_defaults(func=_then_evaluate(train.get_default("func")))
  parser = subparsers.add_parser("eval", help="evaluate a trained model on held-out tasks")
  parser.add_argument("--checkpoint", required=True, help="training workdir (latest checkpoint)")
  parser.add_argument("--split", default="heldout", help="split directory under the data dir")
  parser.add_argument("--tasks", default="all", help="all, or a comma-separated list")
  parser.add_argument("--steps", default="4,8,16,64", help="step counts, comma-separated")
  parser.add_argument("--limit", type=int, help="samples per task (default: all)")
  parser.add_argument("--out", default="eval.json", help="output JSON")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--data", help="data directory (default: the run's data.dir)")
  parser.add_argument("--decoder", choices=DECODERS, help="diffusion, or ar: one token per "
                      "forward pass, no steps to sweep (default: the run's objective's)")
  add_cache_flags(parser)
  parser.set_defaults(func=run_eval)


def outputs_beside(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """The quality-vs-steps and samples pictures written next to the JSON."""
  return out.with_suffix(".png"), out.with_name(out.stem + "_samples.png")


def run_eval(args: argparse.Namespace) -> int:
  from omnijax.config import ConfigError
  from omnijax.data.shards import ManifestError

  try:
    return _eval(args)
  except (ValueError, ManifestError) as e:
    if isinstance(e, ConfigError):
      raise
    print(f"omnijax eval: {e}", file=sys.stderr)
    return 2


def _eval(args: argparse.Namespace) -> int:
  from omnijax.eval.evaluate import parse_steps, parse_tasks
  from omnijax.files import resolve

  tasks, steps = parse_tasks(args.tasks), parse_steps(args.steps)
  if args.limit is not None and args.limit < 1:
    raise ValueError(f"--limit={args.limit} must be >= 1")
  check_out(resolve(args.out))  # before the model is loaded, and again before evaluating
  from omnijax.generate.run import open_run

  run, generator, split_dir = open_run(args.checkpoint, data_dir=args.data, split=args.split,
                                       batch_size=args.batch_size, decoder=args.decoder)
  overrides = {name: value for name, value in
               dict(cache=args.cache, cache_refresh=args.cache_refresh).items()
               if value is not None}
  print(f"evaluating {args.checkpoint} at step {run.step} on {split_dir}", flush=True)
  run_and_write(generator, split_dir, tasks, steps, resolve(args.out), limit=args.limit,
                meta={"checkpoint": str(args.checkpoint), "step": run.step, "split": args.split},
                train_split=run.config.data.split, overrides=overrides)
  return 0


def check_out(out: pathlib.Path) -> None:
  """Refuses an output JSON (or a picture beside it) that names a directory, or a JSON whose
  picture would be the JSON itself, before anything is evaluated."""
  if out in outputs_beside(out):
    raise ValueError(f"--out {out}: the pictures beside it are {out.stem}.png and "
                     f"{out.stem}_samples.png; give the JSON a .json name")
  if out.is_dir():
    raise ValueError(f"--out {out} is a directory; name the JSON file to write, e.g. "
                     f"{out / 'eval.json'}")
  for picture in outputs_beside(out):
    if picture.is_dir():
      raise ValueError(f"--out {out}: its picture {picture} is a directory; choose another --out")


def run_and_write(generator, split_dir, tasks, steps, out: pathlib.Path, *, limit, meta,
                  train_split: str, overrides: dict | None = None) -> dict:
  """Evaluates, writes JSON, samples and pictures, prints the table; shared with the main job.
  Chance baselines come from the `train_split` directory beside `split_dir`; `overrides`
  (decode settings: cache, cache_refresh) change every task's table row and are checked before
  anything decodes. A second evaluation writing the same JSON meanwhile is refused
  (omnijax.files.output_lock)."""
  from tqdm import tqdm

  from omnijax.eval.evaluate import (batches_needed, check_overrides, evaluate, format_table,
                                     plot_quality, plot_samples, samples_beside, write_json,
                                     write_samples)
  from omnijax.files import output_lock

  overrides = overrides or {}
  check_out(out)
  with output_lock(out, "eval"):
    check_overrides(generator, split_dir, tasks, steps, overrides)
    total = batches_needed(generator, split_dir, tasks, steps, limit)
    with tqdm(total=total, desc="eval", unit="batch", file=sys.stderr) as progress:
      results, kept = evaluate(generator, split_dir, tasks, steps, limit=limit,
                               progress=progress, keep_outputs=True, train_split=train_split,
                               overrides=overrides)
    write_json(out, results, {**meta, "decoder": generator.decoder, "tasks": list(tasks),
                              "steps": list(steps), "limit": limit, "chance_split": train_split,
                              **overrides})
    write_samples(samples_beside(out), generator, kept)
    quality_png, samples_png = outputs_beside(out)
    plot_quality(results, quality_png)
    written = [out, samples_beside(out), quality_png]
    if generator.toy_spec is not None and ("t2i" in kept or "caption" in kept):
      plot_samples(generator, kept, samples_png)
      written.append(samples_png)
  print(format_table(results))
  print("wrote " + ", ".join(map(str, written)))
  return results


def _then_evaluate(run_train):
  def train_then_evaluate(args: argparse.Namespace) -> int:
    code = run_train(args)
    if code == 0 and args.stage is None:
      evaluate_after_training(args.workdir)
    return code

  return train_then_evaluate


def evaluate_after_training(workdir: str | pathlib.Path) -> dict | None:
  """The main job's last act, when the run's `eval.after_training` is on and its last stage is
  done: the final model on `eval.samples` held-out samples of every task at `eval.steps` (and
  the defaults) -> WORKDIR/eval.json, samples.jsonl, eval.png and eval_samples.png."""
  from omnijax.data.tasks import TASKS
  from omnijax.generate.run import Generator, run_decoder
  from omnijax.files import resolve
  from omnijax.train.restore import read_run_config, restore_workdir

  config = read_run_config(workdir)
  if not config.eval.after_training:
    return None
  import jax

  if jax.process_count() > 1:
    # The sampler reads its results back on one host; a multi-host job leaves the
    # evaluation to `omnijax eval` on a single host.
    print("eval.after_training: skipped in a multi-process job; run `omnijax eval "
          f"--checkpoint {workdir}` on one host", flush=True)
    return None
  run = restore_workdir(workdir)
  if run.step != sum(stage.steps for stage in config.train.stages.values()):
    return None  # stopped early (SIGTERM, --max-steps): the final model does not exist yet
  settings = config.eval
  split_dir = pathlib.Path(config.data.dir) / settings.split
  generator = Generator.for_data(run.model, config.model.vocab.build(), split_dir,
                                 settings.batch_size, run_decoder(config))
  print(f"evaluating step {run.step} on {settings.samples} samples of each task in {split_dir}",
        flush=True)
  return run_and_write(generator, split_dir, TASKS, settings.steps,
                       resolve(workdir) / "eval.json", limit=settings.samples,
                       meta={"checkpoint": str(workdir), "step": run.step,
                             "split": settings.split}, train_split=config.data.split)
