"""Per-task decode settings: one table following the release's (reference §4.8).

Canvas lengths follow the release's rules; the constants behind them (codes per image, speech
codes per text token, ...) belong to the codecs, and whether guidance applies to how the model
was trained, so they live in `DecodeConstants`: the release's values by default, the toy world's
derived from its spec. Every value can be overridden per call.
"""

from __future__ import annotations

import dataclasses
import math

from omnijax.config import ConfigError, check_seed
from omnijax.messages import clip
from omnijax.data.tasks import TASKS
from omnijax.diffusion.settings import DecodeSettings

# Released tasks decode greedily with top_p 0.9 and (probably) top_k 50 (reference §4.3): with
# greedy decoding they only shape the confidence.
TOP_P, TOP_K = 0.9, 50


@dataclasses.dataclass(frozen=True)
class DecodeConstants:
  """What the table's rules take from the data and the model's training; defaults are the
  release's."""

  image_codes: int = 256  # generated image: 16 x 16 MAGVIT-v2 codes
  caption: int = 64  # the VQA demo's canvas (captions are long answers)
  vqa: int = 8  # MME evaluation: short answers
  svqa: int = 128
  asr_per_prompt_token: float = 0.2  # evaluate_asr.py: int(0.2 x prompt length)
  tts_per_text_token: float = 3.5  # evaluate_libritts.py: int(3.5 x text BPE tokens)
  # A spoken answer's <|begin_of_audio|> is prefilled at floor(svqa_audio_at x canvas), leaving
  # the first part for the text answer (reference §4.6); None leaves its place to the model.
  svqa_audio_at: float | None = 0.2
  # svqa's semi-autoregressive block (0: the whole canvas is one block, the release's): blocks
  # decode left to right, so a text answer at the canvas's start settles before the speech
  # that speaks it.
  svqa_block_size: int = 0
  # Whether the table's classifier-free guidance applies (the release's s2i: cfg 2). Guidance
  # contrasts the prompt with the task's unconditional one (an empty user turn), so it needs a
  # model trained on such prompts too; one that never saw them answers it with noise.
  guidance: bool = True

  @classmethod
  def toy_world(cls, spec) -> DecodeConstants:
    """Canvases that hold the longest response of the toy world's training split and one tail
    pad after it (VQA keeps the release's 8: its responses, at most 4 tokens, end within the
    tail pads).

    Training follows every response with 1-16 supervised pads (toy.yaml gives TTS up to 36 and
    captions up to 17: their canvases leave that much room after the shorter responses), so a
    canvas position past the response is one the model saw only as a pad, and a response that
    fills the canvas to its last position is one it never saw: at exactly the longest caption's
    27 tokens it left out a three-object caption's third object (validation exact captions
    62.5 % at 27, 96.9 % at 28).
    Much more slack went badly too: the former, looser constants (caption and svqa 32, ASR 0.3,
    TTS 8) cost the long config's model 11 points on captions, 14 on ASR and 27 on TTS
    (docs/benchmarks.md, "Toy canvases"). The assistant's steady voice speaks 4.0-5.4 codes
    per BPE token (GLM-4-Voice: about 3.5), and the TTS response adds its audio and turn
    markers; ASR transcripts hold 15-22 % as many tokens as the ASR prompt.

    A spoken answer's `<|begin_of_audio|>` is not prefilled: the toy world's text answers are
    one or two words (2-3 tokens with their newline) and training puts the audio right after
    them, so the release's 20 % (index 4 of 20) sat one or two places late and the speech that
    followed began one code in, as if the prefilled token were its first: a two-word answer
    lost its first word (validation speech WER 67.8 % prefilled, 45.6 % placed by the model,
    the same model; docs/benchmarks.md).

    Without the prefill nothing marks where the text answer ends, and decoding the whole canvas
    at once committed speech before the text it speaks: the spoken answer named another
    attribute than the written one. svqa decodes in blocks of 4, left to right (validation
    min(text, 1 - speech WER) 37.8 % in one block, 45.6 % in blocks of 4: text 46.9 → 56.2 %,
    speech WER 62.2 → 54.4 %; docs/benchmarks.md, "Sixth round").

    No guidance: the toy world has no unconditional prompts to train on, and with the release's
    cfg 2 a model that draws 84 % of validation scenes from speech drew 12.5 % (docs/benchmarks.md,
    "Fifth round")."""
    return cls(image_codes=spec.images.codes_per_image, caption=28, vqa=8, svqa=20,
               asr_per_prompt_token=0.24, tts_per_text_token=6.0, svqa_audio_at=None,
               svqa_block_size=4, guidance=False)


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  canvas: str  # the canvas rule: image | caption | vqa | svqa | asr | tts
  steps: str  # canvas (one token per step, the release's default) | half (N // 2)
  alg: str
  repeat_penalty: float = 1.0
  position_penalty: float = 1.0
  cfg: float = 0.0
  spoken_answer: bool = False  # text then speech: prefill <|begin_of_audio|> (DecodeConstants)


# The release's `entropy-penalty` is alg `entropy` with its repetition penalty.
TABLE: dict[str, TaskSettings] = {
    "t2i": TaskSettings("image", "canvas", "entropy", repeat_penalty=1.2, position_penalty=2.0),
    "s2i": TaskSettings("image", "canvas", "entropy", repeat_penalty=1.5, position_penalty=2.0,
                        cfg=2.0),
    "svqa": TaskSettings("svqa", "canvas", "entropy", repeat_penalty=1.2,
                         spoken_answer=True),
    "vqa": TaskSettings("vqa", "canvas", "entropy"),
    "caption": TaskSettings("caption", "canvas", "entropy"),
    "tts": TaskSettings("tts", "half", "entropy", repeat_penalty=1.2),
    "asr": TaskSettings("asr", "half", "entropy"),
}
assert set(TABLE) == set(TASKS), sorted(set(TASKS) ^ set(TABLE))


def canvas_length(task: str, constants: DecodeConstants, *, prompt_tokens: int,
                  text_tokens: int) -> int:
  """The canvas for one input: `prompt_tokens` is the whole prompt's length, `text_tokens` the
  BPE tokens of the text to speak (tts)."""
  rule = TABLE[task].canvas
  if rule == "image":
    return constants.image_codes + 4  # <|begin_of_image|> codes <|end_of_image|> <|im_end|> \n
  if rule == "asr":
    return max(8, int(constants.asr_per_prompt_token * prompt_tokens))
  if rule == "tts":
    return max(8, int(constants.tts_per_text_token * text_tokens))
  return getattr(constants, rule)


def default_steps(task: str, canvas: int) -> int:
  return canvas if TABLE[task].steps == "canvas" else max(1, canvas // 2)


def decode_settings(task: str, canvas: int, vocab, *,
                    constants: DecodeConstants = DecodeConstants(), steps: int | None = None,
                    **overrides) -> DecodeSettings:
  """The decode settings of `task` at `canvas` (its prefill and guidance as `constants` say);
  `overrides` (any `DecodeSettings` field) whose value is None keep the table's value."""
  settings = TABLE[task]
  if steps is not None and steps < 1:
    raise ConfigError(f"--steps {steps}: expected >= 1 (leave it out for the task's default)")
  seed = overrides.get("seed")
  if seed is not None:
    check_seed(seed, f"--seed {clip(str(seed))}")
  prefill = ({math.floor(constants.svqa_audio_at * canvas): vocab.begin_audio_id}
             if settings.spoken_answer and constants.svqa_audio_at is not None else ())
  block_size = constants.svqa_block_size if settings.spoken_answer else 0
  if block_size and steps is not None:  # a budget of fewer steps than blocks widens the blocks
    block_size = max(block_size, math.ceil(canvas / steps))
  table = DecodeSettings(canvas=canvas, steps=default_steps(task, canvas), alg=settings.alg,
                         top_p=TOP_P, top_k=TOP_K, repeat_penalty=settings.repeat_penalty,
                         position_penalty=settings.position_penalty,
                         cfg=settings.cfg if constants.guidance else 0.0,
                         block_size=block_size,
                         prefill=prefill)
  return table.replace(steps=steps, **overrides)
