"""Running tasks on a model: requests -> prompts -> batched sampling -> decoded outputs.

`Generator` turns task inputs (text, image codes, speech codes or audio files: continuous
speech input, for a model with a speech encoder and data made with it) or held-out samples into
prompts templated like the training data, picks each task's canvas and decode settings from
`omnijax.generate.settings`, decodes in batches of one canvas length (a progress bar over
batches) with its decoder (`diffusion`, the sampler; or `ar`, one token per forward pass, for
a model trained with the `ar` objective: by default the run's objective says which), and
post-processes: text through the tokenizer, images padded/cut to the grid, and
for the toy world, images parsed back to scenes and speech decoded to words.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Sequence

import numpy as np

from omnijax.config import DECODERS, ConfigError
from omnijax.data import shards
from omnijax.data.record import Sample
from omnijax.data.requests import INPUTS, request_messages, unconditional_messages
from omnijax.data.tasks import IMAGE_TASKS
from omnijax.data.templates import SPEECH_FIELDS, ChatTemplate
from omnijax.diffusion.postprocess import image_grid, split_modalities, spoken_answer, trim
from omnijax.diffusion import ar_decode, sampler
from omnijax.diffusion.objective import get_objective
from omnijax.generate import settings as settings_lib
from omnijax.vocab import Vocab

SPEECH_TASKS = ("tts", "svqa")
# Canvases from length rules (asr, tts) round up to this: a few shapes to compile, not one per
# input length; the model fills the spare positions with <|endoftext|>.
CANVAS_BUCKET = 16
# decoder name -> decode(model, vocab, prompts, settings, *, uncond_prompts) -> SampleResult
DECODE = {"diffusion": sampler.decode, "ar": ar_decode.decode}
assert tuple(DECODE) == DECODERS, (tuple(DECODE), DECODERS)
# The decode settings only the diffusion decoder reads: given to the ar decoder, refused.
DIFFUSION_ONLY = ("steps", "alg", "position_penalty", "block_size", "threshold", "cache",
                  "cache_refresh")


def run_decoder(config) -> str:
  """The decoder of a run's model: the one its training objective names."""
  return get_objective(config.train.objective.kind).decoder


@dataclasses.dataclass(frozen=True)
class Request:
  task: str
  prompt: np.ndarray  # int32 prompt ids, ending with `<|im_start|>assistant\n`
  canvas: int
  uncond: np.ndarray | None = None  # the unconditional prompt (CFG)
  # continuous speech input: features [frames, F] of each clip the prompt's placeholders take
  speech_clips: tuple[np.ndarray, ...] = ()


@dataclasses.dataclass
class Output:
  task: str
  canvas: np.ndarray  # the decoded canvas, untrimmed
  forward_passes: int
  text: str = ""  # text part, special tokens dropped
  image_codes: np.ndarray | None = None  # image tasks: exactly one grid of codes
  speech_codes: np.ndarray | None = None  # speech tasks: the spoken codes
  words: list[str] | None = None  # toy world: the speech decoded to words
  scene: object | None = None  # toy world: the generated image parsed back to a scene
  # Diffusion: those of its forward passes that ran the whole rows (the others, with a cache,
  # ran only the cached window: SampleResult.whole_row_passes); None for the ar decoder.
  whole_row_passes: int | None = None


class Generator:
  """A model with its vocabulary, chat template, decode constants and decoder (and the toy
  world's codecs when the data is the toy world)."""

  def __init__(self, model, vocab: Vocab, template: ChatTemplate,
               constants: settings_lib.DecodeConstants, toy_spec=None, batch_size: int = 16,
               decoder: str = "diffusion", cmvn=None):
    if batch_size < 1:
      raise ConfigError(f"--batch-size {batch_size}: expected >= 1")
    if decoder not in DECODERS:
      raise ConfigError(f"--decoder {decoder}: expected one of {', '.join(DECODERS)}")
    self.model, self.vocab, self.template = model, vocab, template
    self.constants, self.toy_spec, self.batch_size = constants, toy_spec, batch_size
    self.decoder = decoder
    # The CMVN statistics the data's speech features were made with: continuous speech input
    # is computed with them and the model's front end (None: the data has none).
    self.cmvn = cmvn
    self._tts_overhead: int | None = None

  @classmethod
  def for_data(cls, model, vocab: Vocab, split_dir: str | pathlib.Path,
               batch_size: int = 16, decoder: str = "diffusion") -> Generator:
    """Tokenizer, image sizes and (toy world) codecs from a shard directory's manifest."""
    from omnijax.data.toyworld.world import ToyWorldSpec

    split_dir = pathlib.Path(split_dir)
    manifest = shards.load_manifest(split_dir)
    shards.check_vocab(manifest, vocab, str(split_dir / shards.MANIFEST))
    tokenizer = split_dir / manifest.get("tokenizer", "tokenizer.json")
    if not tokenizer.exists():
      raise shards.ManifestError(f"{split_dir / shards.MANIFEST}: its tokenizer {tokenizer} "
                                 "does not exist")
    template = ChatTemplate.from_file(str(tokenizer), vocab, shards.image_lengths_of(manifest))
    spec = ToyWorldSpec(**manifest["toyworld"]) if "toyworld" in manifest else None
    constants = (settings_lib.DecodeConstants.toy_world(spec) if spec else
                 settings_lib.DecodeConstants(image_codes=template.image_lengths.generated))
    return cls(model, vocab, template, constants, spec, batch_size, decoder,
               _speech_cmvn(model, split_dir, manifest))

  # --- requests ---------------------------------------------------------------------------------
  def _prompt(self, task: str, messages: list[dict], images=(), speeches=(),
              clips=()) -> np.ndarray:
    conversation = [*messages, {"role": "assistant", "content": ""}]
    return self.template.encode(task, conversation, images, speeches, clips).prompt

  def _text_tokens(self, prompt: np.ndarray) -> int:
    """BPE tokens of the text to speak in a tts prompt: its text ids minus the template's."""
    if self._tts_overhead is None:
      probe = "a"
      ids = self._prompt("tts", request_messages("tts", probe))
      self._tts_overhead = int(np.sum(ids < self.vocab.text_size)) - len(
          self.template.tokenizer.encode(probe, add_special_tokens=False).ids)
    return int(np.sum(prompt < self.vocab.text_size)) - self._tts_overhead

  def rule_canvas(self, task: str, prompt: np.ndarray) -> int:
    """The task's canvas rule for `prompt`, before rounding up to `CANVAS_BUCKET`."""
    return settings_lib.canvas_length(task, self.constants, prompt_tokens=len(prompt),
                                      text_tokens=self._text_tokens(prompt)
                                      if task == "tts" else 0)

  def _request(self, task: str, prompt: np.ndarray, canvas: int | None,
               clips: Sequence[np.ndarray] = ()) -> Request:
    if canvas is None:
      canvas = self.rule_canvas(task, prompt)
      if settings_lib.TABLE[task].canvas in ("asr", "tts"):
        canvas = -(-canvas // CANVAS_BUCKET) * CANVAS_BUCKET
    uncond = None
    if settings_lib.TABLE[task].cfg > 0 or task in IMAGE_TASKS:
      uncond = self._prompt(task, unconditional_messages(task))
    return Request(task, prompt, int(canvas), uncond, tuple(clips))

  def request(self, task: str, *, text: str | None = None, image_codes=None, speech_codes=None,
              speech_audio: str | None = None, canvas: int | None = None) -> Request:
    """A request from raw inputs; which ones each task needs: `omnijax.data.requests.INPUTS`.
    Speech is codes (`speech_codes`) or an audio file (`speech_audio`: continuous input)."""
    if speech_codes is not None and speech_audio is not None:
      raise ValueError("give speech as codes or as an audio file, not both")
    given = {"text": text, "image": image_codes,
             "speech": speech_codes if speech_audio is None else speech_audio}
    missing = [name for name in INPUTS[task] if name != "text" and given[name] is None]
    if missing:
      audio = " or an audio file" if missing[0] == "speech" and self.cmvn is not None else ""
      raise ValueError(f"task {task} needs {missing[0]} codes{audio}")
    extra = [name for name, value in given.items()
             if value is not None and name not in INPUTS[task] and not (name == "text" and task == "caption")]
    if extra:
      raise ValueError(f"task {task} takes no {extra[0]} input (it reads: {', '.join(INPUTS[task])})")
    images = [self._codes("image", image_codes)] if image_codes is not None else []
    speeches = [self._codes("speech", speech_codes)] if speech_codes is not None else []
    clips = [self._audio(speech_audio)] if speech_audio is not None else []
    prompt = self._prompt(task, request_messages(task, text), images, speeches, clips)
    return self._request(task, prompt, canvas, clips)

  def _audio(self, path: str) -> np.ndarray:
    """An audio file as the model hears it: the data's front end (features [frames, F])."""
    from omnijax.data.audio import audio_features

    if self.cmvn is None:
      raise ValueError(f"speech {path}: this run takes no continuous speech input (its model has "
                       "no speech encoder, or its data no speech features and CMVN statistics); "
                       "give speech codes")
    return audio_features(path, self.model.config.speech_encoder, self.cmvn)

  def _codes(self, kind: str, codes) -> np.ndarray:
    """Input codes as the model reads them, or ValueError saying what was found and expected:
    integers (never rounded), 1-D for speech, for an image its grid or the grid's flattening,
    each within its codebook."""
    codes = np.asarray(codes)
    count = self.vocab.n_image_codes if kind == "image" else self.vocab.n_speech_codes
    length = self.template.image_lengths.understanding
    side = math.isqrt(length)
    shapes = ([(length,)] + ([(side, side)] if side * side == length else [])
              if kind == "image" else [])
    expected = (f"integer codes in [0, {count}), " +
                (f"shape {' or '.join(map(str, shapes))}" if shapes else "1-D"))
    integers = np.issubdtype(codes.dtype, np.integer) or codes.dtype == object
    if not integers or not codes.size:
      raise ValueError(f"{kind} codes of dtype {codes.dtype} and shape {codes.shape}: expected "
                       f"{expected}")
    well_shaped = codes.shape in shapes if kind == "image" else codes.ndim == 1
    if not well_shaped:
      raise ValueError(f"{kind} codes of shape {codes.shape}: expected {expected}")
    codes = codes.ravel()
    try:
      (self.vocab.image_ids if kind == "image" else self.vocab.speech_ids)(codes)
    except (TypeError, ValueError) as e:  # beyond the codebook, or a JSON value not an integer
      raise ValueError(f"{e}: expected {expected}") from None
    return codes.astype(np.int64)

  def request_from_sample(self, sample: Sample, canvas: int | None = None) -> Request:
    """The request of a templated sample (its prompt and speech clips, as trained)."""
    clips = ()
    if SPEECH_FIELDS[0] in sample.fields:
      features, lengths = (sample.fields[name] for name in SPEECH_FIELDS)
      clips = np.split(features, np.cumsum(lengths)[:-1])
    return self._request(sample.task, sample.prompt, canvas, clips)

  # --- decoding ---------------------------------------------------------------------------------
  def decode(self, requests: Sequence[Request], *, steps: int | None = None, progress=None,
             **overrides) -> tuple[list[Output], float]:
    """Outputs in request order and the decode seconds (compilation excluded). Requests are
    batched by (task, canvas); `progress` (a tqdm bar) advances once per batch."""
    decode = DECODE[self.decoder]
    outputs: list[Output | None] = [None] * len(requests)
    groups: dict[tuple[str, int], list[int]] = {}
    for index, request in enumerate(requests):
      groups.setdefault((request.task, request.canvas), []).append(index)
    seconds = 0.0
    for (task, canvas), indices in groups.items():
      settings = self._decode_settings(task, canvas, steps, overrides)
      for begin in range(0, len(indices), self.batch_size):
        batch = [requests[i] for i in indices[begin:begin + self.batch_size]]
        uncond = [r.uncond for r in batch] if settings.cfg > 0 else None
        speech = ({"speech": [r.speech_clips for r in batch]}
                  if any(r.speech_clips for r in batch) else {})
        result = decode(self.model, self.vocab, [r.prompt for r in batch], settings,
                        uncond_prompts=uncond, **speech)
        seconds += result.seconds
        whole_rows = (result.whole_row_passes if result.whole_row_passes is not None else
                      [None] * len(batch))
        for index, row, passes, whole in zip(indices[begin:begin + self.batch_size],
                                             result.canvases, result.forward_passes, whole_rows):
          outputs[index] = self.postprocess(task, row, int(passes))
          outputs[index].whole_row_passes = None if whole is None else int(whole)
        if progress is not None:
          progress.update(1)
    return outputs, seconds

  def check_settings(self, requests: Sequence[Request], *, steps: int | None = None,
                     **overrides) -> None:
    """Raises the error `decode` would raise for these settings, before anything runs (so no
    progress bar precedes it): a decode of no prompts checks them and returns at once."""
    for task, canvas in {(request.task, request.canvas) for request in requests}:
      settings = self._decode_settings(task, canvas, steps, overrides)
      if settings.cache != "none" and any(
          r.speech_clips for r in requests if (r.task, r.canvas) == (task, canvas)):
        raise ValueError(sampler.SPEECH_CACHE_REFUSAL)
      DECODE[self.decoder](self.model, self.vocab, [], settings,
                           uncond_prompts=[] if settings.cfg > 0 else None)

  def _decode_settings(self, task: str, canvas: int, steps: int | None, overrides: dict):
    """The task's table row with the given overrides; the ar decoder refuses the settings only
    diffusion reads (`DIFFUSION_ONLY`)."""
    if self.decoder == "ar":
      given = [name for name, value in dict(overrides, steps=steps).items()
               if name in DIFFUSION_ONLY and value is not None]
      if given:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag}: the ar decoder makes one token per forward pass, so the "
                         f"diffusion setting {given[0]} does not apply; leave it out")
    return settings_lib.decode_settings(task, canvas, self.vocab, constants=self.constants,
                                        steps=steps, **overrides)

  def batches(self, requests: Sequence[Request]) -> int:
    """How many batches `decode` runs (for a progress bar's total)."""
    counts: dict[tuple[str, int], int] = {}
    for request in requests:
      counts[request.task, request.canvas] = counts.get((request.task, request.canvas), 0) + 1
    return sum(-(-n // self.batch_size) for n in counts.values())

  def postprocess(self, task: str, canvas: np.ndarray, forward_passes: int) -> Output:
    out = Output(task, canvas, forward_passes)
    if task == "svqa":
      text_ids, speech_ids = spoken_answer(canvas, self.vocab)
      parts = split_modalities(text_ids, self.vocab)
      out.speech_codes = split_modalities(speech_ids, self.vocab).speech
    else:
      parts = split_modalities(trim(canvas, self.vocab), self.vocab)
      if task in SPEECH_TASKS:
        out.speech_codes = parts.speech
    out.text = self.template.tokenizer.decode(parts.text.tolist()).strip()
    if task in IMAGE_TASKS:
      out.image_codes = image_grid(parts.image, self.constants.image_codes,
                                   self.vocab.n_image_codes)
    if self.toy_spec is not None:
      if out.speech_codes is not None:
        out.words = self.toy_spec.speech.decode(out.speech_codes)
      if out.image_codes is not None:
        out.scene = self.toy_spec.images.decode(out.image_codes)
    return out


def _speech_cmvn(model, split_dir: pathlib.Path, manifest: dict):
  """The CMVN statistics of the data's continuous speech, for a model with a speech encoder
  (None otherwise)."""
  from omnijax.data.speech_frontend import FrontendError, read_cmvn

  encoder = getattr(model.config, "speech_encoder", None)
  path = shards.cmvn_path(split_dir, manifest)
  if encoder is None or path is None:
    return None
  try:
    return read_cmvn(path, encoder.feature_size)
  except FrontendError as e:
    raise shards.ManifestError(f"{split_dir / shards.MANIFEST}: its CMVN statistics: {e}") \
        from None


def read_samples(split_dir: str | pathlib.Path, task: str, limit: int | None = None) -> list[Sample]:
  """The first `limit` samples of `task` in a shard directory, in file order; a shard that is
  missing, not a regular file, truncated or holds a record that does not decode is a ShardError
  naming it (and the record)."""
  from omnijax.data import record

  manifest = shards.load_manifest(split_dir)
  samples: list[Sample] = []
  for shard in manifest["shards"]:
    if shard["task"] != task:
      continue
    path = pathlib.Path(split_dir) / shard["file"]
    reader = shards.open_shard(path, shard["records"])
    try:
      wanted = shard["records"] if limit is None else min(shard["records"], limit - len(samples))
      for index, payload in enumerate(reader.read(list(range(wanted)))):
        try:
          samples.append(record.decode(payload))
        except record.RecordError as e:
          raise shards.ShardError(f"{path}: record {index}: {e}") from None
    finally:
      shards.close_quietly(reader)
    if limit is not None and len(samples) >= limit:
      break
  return samples


def open_run(workdir: str | pathlib.Path, *, data_dir: str | None = None,
             split: str | None = None, batch_size: int = 16, decoder: str | None = None,
             step: int | None = None):
  """(the restored run, a Generator on its model, the split directory) for a training
  workdir at checkpoint `step` (default: its newest); the tokenizer and codecs come from
  `data_dir` (default: the run's data.dir) / `split` (default: data.split), the decoder is
  `decoder` (default: the run's)."""
  from omnijax.train.restore import restore_workdir

  run = restore_workdir(workdir, step=step)
  split_dir = pathlib.Path(data_dir or run.config.data.dir) / (split or run.config.data.split)
  vocab = run.config.model.vocab.build()
  generator = Generator.for_data(run.model, vocab, split_dir, batch_size,
                                 decoder or run_decoder(run.config))
  return run, generator, split_dir
