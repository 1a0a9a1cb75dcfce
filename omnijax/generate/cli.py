"""`omnijax generate`: one task on given inputs with a trained workdir's model.

    omnijax generate --checkpoint runs/toy --task t2i --text "there is a red circle at the top left"
    omnijax generate --checkpoint runs/toy --task asr --speech-codes codes.npy --steps 8
    omnijax generate --checkpoint runs/toy_speech --task asr --speech question.wav
    omnijax generate --checkpoint runs/toy --task caption --input requests.jsonl --out outputs/

Writes OUT/results.jsonl (one line per input: text, codes, decoded words and scene for the toy
world, forward passes) and, for image tasks on the toy world, OUT/images/NNNN.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from omnijax.config import DECODERS, SAMPLER_ALGS, SAMPLER_CACHES
from omnijax.data.tasks import TASKS


def register(subparsers) -> None:
  parser = subparsers.add_parser("generate", help="run a task with a trained model")
  parser.add_argument("--checkpoint", required=True, help="training workdir (latest checkpoint)")
  parser.add_argument("--task", required=True, choices=TASKS)
  parser.add_argument("--text", help="caption to draw (t2i), question (vqa), text to speak (tts)")
  parser.add_argument("--image", help="image (PNG) for caption/vqa/svqa; toy-world runs only "
                      "(released models need MAGViT-v2 codes: --image-codes)")
  parser.add_argument("--image-codes", help="image codes: a .npy/.json/.txt file or 1,2,3,...")
  parser.add_argument("--speech-codes", help="speech codes: a .npy/.json/.txt file or 1,2,3,...")
  parser.add_argument("--speech", help="speech as audio (wav, flac, ...; mono, resampled to the "
                      "encoder's rate) for asr/s2i/svqa: continuous input, for a model with a "
                      "speech encoder")
  parser.add_argument("--input", help="JSONL, one request a line: {text, image (a PNG path) or "
                      "image_codes, speech_codes or speech (an audio path)}")
  parser.add_argument("--out", default="generated", help="output directory")
  parser.add_argument("--decoder", choices=DECODERS, help="diffusion, or ar: one token per "
                      "forward pass (default: the run's objective's)")
  parser.add_argument("--steps", type=int, help="decoding steps (default: the task's table)")
  parser.add_argument("--canvas", type=int, help="canvas length (default: the task's rule)")
  parser.add_argument("--alg", choices=SAMPLER_ALGS)
  parser.add_argument("--temperature", type=float)
  parser.add_argument("--top-p", type=float)
  parser.add_argument("--top-k", type=int)
  parser.add_argument("--repeat-penalty", type=float)
  parser.add_argument("--position-penalty", type=float)
  parser.add_argument("--cfg", type=float)
  parser.add_argument("--block-size", type=int)
  parser.add_argument("--threshold", type=float)
  add_cache_flags(parser)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--data", help="data directory with the tokenizer (default: the run's "
                      "data.dir)")
  parser.set_defaults(func=run_generate)


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
  """--cache and --cache-refresh (generate and eval)."""
  parser.add_argument("--cache", choices=SAMPLER_CACHES, help="the diffusion sampler's KV cache: "
                      "prefix (the prompt's keys and values) or dual (every column outside the "
                      "block being decoded), reused between refreshes (approximate; default "
                      "none)")
  parser.add_argument("--cache-refresh", type=int, help="with --cache: refresh every N steps "
                      "of a block (default 0: at each block's first step only)")


def read_codes(value: str, what: str):
  """Codes from an inline list or a .npy / .json / whitespace- or comma-separated text file,
  exactly as written: their dtype and shape are checked against the task's (Generator.request),
  never rounded or flattened here."""
  import numpy as np

  from omnijax.messages import clip, quoted
  from omnijax.files import check_regular_file

  path = pathlib.Path(value)
  try:
    check_regular_file(path)  # /dev/zero would be read forever
    if path.suffix == ".npy" and path.is_file():
      return np.load(path, allow_pickle=False)
    if path.is_file():
      text = path.read_text()
      if path.suffix == ".json":
        return np.asarray(json.loads(text))
    else:
      text = value
    return np.asarray([int(word) for word in text.replace(",", " ").split()])
  except (ValueError, TypeError, OSError) as e:
    raise ValueError(f"{what} {quoted(value)}: not a list of integer codes ({clip(str(e))})") \
        from None


def read_requests(args) -> list[dict]:
  from omnijax.messages import clip, quoted

  if args.input:
    if args.text or args.image or args.image_codes or args.speech_codes or args.speech:
      raise ValueError("--input replaces --text/--image/--image-codes/--speech-codes/--speech; "
                       "give one or the other")
    requests = []
    try:
      lines = pathlib.Path(args.input).read_text().splitlines()
    except OSError as e:
      raise ValueError(f"--input {args.input}: {e.strerror or e}") from None
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        if not isinstance(entry, dict):
          raise ValueError("expected a JSON object")
        unknown = set(entry) - {"text", "image", "image_codes", "speech_codes", "speech"}
        if unknown:
          raise ValueError(f"unknown key {quoted(sorted(unknown)[0])}")
        for pair in (("image", "image_codes"), ("speech", "speech_codes")):
          if set(pair) <= set(entry):
            raise ValueError(f"give {pair[0]!r} or {pair[1]!r}, not both")
        if "speech" in entry and not isinstance(entry["speech"], str):
          raise ValueError("'speech' must be an audio file's path")
      except ValueError as e:
        raise ValueError(f"{args.input}:{number}: {e}") from None
      for key in ("image", "speech"):  # a relative path is relative to the JSONL file
        if key in entry:
          entry[key] = str(pathlib.Path(args.input).parent / entry[key])
      requests.append(dict(entry, where=f"{args.input}:{number}"))
    if not requests:
      raise ValueError(f"--input {args.input}: no requests")
    return requests
  # An error names the option and file that gave the codes.
  options = [f"{option} {value}" for option, value in (("--image-codes", args.image_codes),
                                                       ("--speech-codes", args.speech_codes),
                                                       ("--speech", args.speech))
             if value]
  request = {"text": args.text, "where": clip(", ".join(options)) or "the command line"}
  if args.image and args.image_codes:
    raise ValueError("give --image or --image-codes, not both")
  if args.image:
    request["image"] = args.image
  if args.image_codes:
    request["image_codes"] = read_codes(args.image_codes, "--image-codes")
  if args.speech and args.speech_codes:
    raise ValueError("give --speech or --speech-codes, not both")
  if args.speech_codes:
    request["speech_codes"] = read_codes(args.speech_codes, "--speech-codes")
  if args.speech:
    request["speech"] = args.speech
  return [request]


def run_generate(args: argparse.Namespace) -> int:
  from omnijax.config import ConfigError
  from omnijax.data.shards import ManifestError
  from omnijax.data.templates import TemplateError

  try:
    return _generate(args)
  except (ValueError, ManifestError, TemplateError) as e:
    if isinstance(e, ConfigError):
      raise
    print(f"omnijax generate: {e}", file=sys.stderr)
    return 2


def _generate(args: argparse.Namespace) -> int:
  import numpy as np
  from tqdm import tqdm

  from omnijax.files import output_lock
  from omnijax.generate.run import open_run
  from omnijax.train.restore import read_run_config

  raw = read_requests(args)
  out = pathlib.Path(args.out)
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} exists and is not a directory")
  if (out / "results.jsonl").is_dir():
    raise ValueError(f"--out {out}: {out / 'results.jsonl'} is a directory")
  # The canvas is checked against the model's sequence length before anything is allocated.
  seq_len = read_run_config(args.checkpoint).data.seq_len
  if args.canvas is not None and not 1 <= args.canvas < seq_len:
    raise ValueError(f"--canvas {args.canvas}: expected 1 to {seq_len - 1} (the model's sequence "
                     f"length, data.seq_len={seq_len} in {args.checkpoint}/config.yaml, holds the "
                     "prompt and the canvas)")
  _, generator, _ = open_run(args.checkpoint, data_dir=args.data, batch_size=args.batch_size,
                             decoder=args.decoder)
  requests = []
  for entry in raw:
    try:
      image_codes = entry.get("image_codes")
      if "image" in entry:
        if generator.toy_spec is None:
          raise ValueError("images go in as codes for this model (its image tokenizer, "
                           "MAGViT-v2, runs outside omnijax): use image_codes")
        image_codes = generator.toy_spec.images.load_png(entry["image"])
      requests.append(generator.request(args.task, text=entry.get("text"),
                                        image_codes=image_codes,
                                        speech_codes=entry.get("speech_codes"),
                                        speech_audio=entry.get("speech"),
                                        canvas=args.canvas))
    except ValueError as e:
      raise ValueError(f"{entry['where']}: {e}") from None
    if args.canvas is not None and len(requests[-1].prompt) + args.canvas > seq_len:
      raise ValueError(f"{entry['where']}: its prompt of {len(requests[-1].prompt)} tokens and "
                       f"--canvas {args.canvas} exceed the model's sequence length {seq_len} "
                       f"(data.seq_len in {args.checkpoint}/config.yaml)")
  overrides = dict(alg=args.alg, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, repeat_penalty=args.repeat_penalty,
                   position_penalty=args.position_penalty, cfg=args.cfg,
                   block_size=args.block_size, threshold=args.threshold, seed=args.seed,
                   cache=args.cache, cache_refresh=args.cache_refresh)
  generator.check_settings(requests, steps=args.steps, **overrides)
  # Held from before decoding: a second generate into the same --out is refused before it
  # decodes, and never replaces the first one's results.
  with output_lock(out / "results.jsonl", "generate"):
    with tqdm(total=generator.batches(requests), desc=f"generate {args.task}", unit="batch",
              file=sys.stderr) as progress:
      outputs, seconds = generator.decode(requests, steps=args.steps, progress=progress,
                                          **overrides)
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(args, generator, outputs, out)
  print(f"{len(outputs)} outputs in {out}/results.jsonl; {seconds:.2f} s decoding, "
        f"{np.mean([o.forward_passes for o in outputs]):.1f} forward passes each")
  return 0


def _write_outputs(args, generator, outputs, out: pathlib.Path) -> None:
  """OUT/results.jsonl, last, and OUT/images/NNNN.png (toy world), each replaced whole."""
  from omnijax.files import atomic_write, atomic_write_text

  lines = []
  for index, output in enumerate(outputs):
    record = {"index": index, "task": args.task, "text": output.text,
              "forward_passes": output.forward_passes, "canvas": output.canvas.tolist()}
    if output.image_codes is not None:
      record["image_codes"] = output.image_codes.tolist()
      if generator.toy_spec is not None:
        (out / "images").mkdir(exist_ok=True)
        png = out / "images" / f"{index:04d}.png"
        atomic_write(png, lambda tmp: generator.toy_spec.images.save_png(output.image_codes, tmp))
        record["png"] = str(png)
    if output.speech_codes is not None:
      record["speech_codes"] = output.speech_codes.tolist()
    if output.words is not None:
      record["transcript"] = " ".join(output.words)
    if output.scene is not None:
      record["scene"] = output.scene.key
    lines.append(json.dumps(record))
    shown = record.get("transcript") or record.get("png") or output.text
    print(f"[{index}] {shown}")
  atomic_write_text(out / "results.jsonl", "\n".join(lines) + "\n")
