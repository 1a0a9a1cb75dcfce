"""Does a trained model read its input image? (issue 23's diagnosis)

  python benchmarks/image_reliance.py --checkpoint runs/toy --tasks caption,vqa --samples 48

For each sample of an image-understanding task (caption, vqa, svqa) on the validation split:
the response is masked (all of it, or a random fraction), and the model scores the true
response once with the sample's own image and once with the next sample's image in its place
(same positions, same length). A model that reads the image predicts the true response better
with its own image: the gap in mean negative log-likelihood per masked token (swapped - own) and
in argmax accuracy measures how much the answer depends on the picture. A gap near 0 means the
model answers from the prompt's words and the answer's template alone, whatever its loss.
"""

from __future__ import annotations

import argparse
import json
import sys

import common  # noqa: F401 - environment for libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from omnijax.data.record import Sample  # noqa: E402
from omnijax.generate.run import open_run, read_samples  # noqa: E402

IMAGE_TASKS = ("caption", "vqa", "svqa")


def image_span(tokens: np.ndarray, vocab) -> slice:
  """The image codes' columns of a prompt (between <|begin_of_image|> and <|end_of_image|>)."""
  begin = np.flatnonzero(tokens == vocab.begin_image_id)
  end = np.flatnonzero(tokens == vocab.end_image_id)
  if len(begin) != 1 or len(end) != 1:
    raise ValueError(f"expected one image in the prompt, found {len(begin)} begin and "
                     f"{len(end)} end markers")
  return slice(int(begin[0]) + 1, int(end[0]))


def with_image_of(sample: Sample, donor: Sample, vocab) -> np.ndarray | None:
  """`sample`'s tokens with `donor`'s image codes in place of its own; None when the two images
  do not occupy the same columns."""
  span, donor_span = image_span(sample.tokens, vocab), image_span(donor.tokens, vocab)
  if span != donor_span:
    return None
  tokens = sample.tokens.copy()
  tokens[span] = donor.tokens[donor_span]
  return tokens


def response_scores(model, tokens: np.ndarray, masked: np.ndarray, vocab) -> tuple[float, float]:
  """(mean NLL, argmax accuracy) of the true tokens at the `masked` columns, the inputs there
  replaced by <|mask|>; the hidden state at column j - 1 scores column j (the Dream shift)."""
  inputs = np.where(masked, vocab.mask_id, tokens)
  logits = model(jnp.asarray(inputs[None]), jnp.ones((1, len(tokens)), jnp.int32))[0]
  log_probs = np.asarray(jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1))
  columns = np.flatnonzero(masked[1:])
  true = tokens[1:][columns]
  nll = -log_probs[columns, true]
  return float(nll.mean()), float((log_probs[columns].argmax(-1) == true).mean())


def reliance(model, vocab, samples: list[Sample], mask_fraction: float, seed: int = 0) -> dict:
  """The own-image and swapped-image scores over `samples`, each given the image of the next
  sample (cyclically) whose image sits in the same columns; a sample with none is left out."""
  own, swapped = [], []
  for index, sample in enumerate(samples):
    donors = (samples[(index + k) % len(samples)] for k in range(1, len(samples)))
    other = next((tokens for tokens in (with_image_of(sample, d, vocab) for d in donors)
                  if tokens is not None and (tokens != sample.tokens).any()), None)
    if other is None:
      continue
    rng = np.random.default_rng([seed, index])
    length = len(sample.tokens) - sample.response_start
    masked = np.zeros(len(sample.tokens), bool)
    chosen = rng.choice(length, max(1, round(mask_fraction * length)), replace=False)
    masked[sample.response_start + chosen] = True
    own.append(response_scores(model, sample.tokens, masked, vocab))
    swapped.append(response_scores(model, other, masked, vocab))
  if not own:
    raise ValueError("no two samples with their images in the same columns to swap")
  own_nll, own_acc = np.mean(own, axis=0)
  swapped_nll, swapped_acc = np.mean(swapped, axis=0)
  return {"samples": len(own), "mask_fraction": mask_fraction,
          "nll_own": float(own_nll), "nll_swapped": float(swapped_nll),
          "nll_gap": float(swapped_nll - own_nll), "accuracy_own": float(own_acc),
          "accuracy_swapped": float(swapped_acc), "accuracy_gap": float(own_acc - swapped_acc)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="training workdir")
  parser.add_argument("--data", default=None, help="data directory (default: the run's)")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--tasks", default="caption,vqa")
  parser.add_argument("--samples", type=int, default=48)
  parser.add_argument("--mask-fractions", default="1,0.5")
  parser.add_argument("--out", default=None, help="JSON output")
  args = parser.parse_args(argv)
  tasks = [task for task in args.tasks.split(",") if task]
  unknown = sorted(set(tasks) - set(IMAGE_TASKS))
  if unknown:
    parser.error(f"--tasks: {', '.join(unknown)} read no image; choose from "
                 f"{', '.join(IMAGE_TASKS)}")
  fractions = [float(f) for f in args.mask_fractions.split(",") if f]
  if not fractions or not all(0 < f <= 1 for f in fractions):
    parser.error(f"--mask-fractions {args.mask_fractions}: expected fractions in (0, 1]")
  run, _, split_dir = open_run(args.checkpoint, data_dir=args.data, split=args.split)
  vocab = run.config.model.vocab.build()
  results = {task: [reliance(run.model, vocab, read_samples(split_dir, task, args.samples), f)
                    for f in fractions] for task in tasks}
  print("| task | masked | samples | NLL own / swapped image | accuracy own / swapped |")
  print("|---|---|---|---|---|")
  for task, rows in results.items():
    for row in rows:
      print(f"| {task} | {row['mask_fraction']:.0%} | {row['samples']} | "
            f"{row['nll_own']:.3f} / {row['nll_swapped']:.3f} | "
            f"{row['accuracy_own']:.1%} / {row['accuracy_swapped']:.1%} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"checkpoint": args.checkpoint, "step": run.step, "split": args.split,
                 "results": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
