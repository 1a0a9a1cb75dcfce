"""ChatML templating: conversations with media placeholders -> token ids (reference §2.3-2.4).

Every turn is `<|im_start|>` + role + "\n" + content + `<|im_end|>` + "\n", each text piece tokenized
separately as the release does. Placeholders consume the media lists in order of appearance:
`<|image|>` -> `<|begin_of_image|>` codes `<|end_of_image|>` and `<|audio|>` ->
`<|begin_of_audio|>` codes `<|end_of_audio|>`, in user and assistant turns alike. Continuous
speech input (the release's: features [frames, F] from omnijax.data.speech_frontend) fills the
`<|audio|>` placeholders of the turns before the assistant's instead, as `<|begin_of_audio|>` +
(frames + 4) x `<|context_of_audio|>` + `<|end_of_audio|>`; the sample carries the clips as
`SPEECH_FIELDS`, and assistant speech stays discrete codes. The response is everything after
the final `<|im_start|>assistant\n`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np
import tokenizers

from omnijax.config import SPEECH_QUERIES
from omnijax.messages import quoted
from omnijax.data.record import FieldSpec, Sample
from omnijax.data.tasks import task_index
from omnijax.files import check_regular_file
from omnijax.vocab import SPECIAL_TOKENS, Modality, Vocab

IMAGE = "<|image|>"
AUDIO = "<|audio|>"
ROLES = ("system", "user", "assistant")
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE)}|{re.escape(AUDIO)})")
# A sample's continuous speech input: its clips' features one after another, float32
# [sum of frames, F], and each clip's frames, int32 [clips] (the model's inputs of these names
# hold a packed row's clips as [K, T, F] and [K]).
SPEECH_FIELDS = ("speech_features", "speech_lengths")


def speech_field_specs(feature_size: int) -> dict[str, FieldSpec]:
  """What shards with continuous speech declare: `SPEECH_FIELDS` for features this wide."""
  return {SPEECH_FIELDS[0]: FieldSpec("float32", (None, feature_size)),
          SPEECH_FIELDS[1]: FieldSpec("int32", (None,))}


def speech_placeholders(frames: int) -> int:
  """`<|context_of_audio|>` tokens of a clip of `frames` encoder input frames: the encoder's
  outputs, its query embeddings included."""
  return frames + SPEECH_QUERIES


def clip_tokens(frames: int) -> int:
  """Tokens a clip of `frames` frames takes in a sequence, its begin and end tokens included."""
  return speech_placeholders(frames) + 2


class TemplateError(ValueError):
  """A conversation cannot be templated; the message says which message and why."""


@dataclasses.dataclass(frozen=True)
class ImageLengths:
  """Codes per image: user-side images are understanding inputs, assistant-side ones generated."""

  understanding: int
  generated: int

  @classmethod
  def release(cls) -> ImageLengths:
    return cls(understanding=1024, generated=256)  # 512 px and 256 px MAGVIT-v2 grids

  def for_role(self, role: str) -> int:
    return self.generated if role == "assistant" else self.understanding


def speech_fields(clips: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
  """The `SPEECH_FIELDS` of a sample with these clips (features [frames, F] each); none without."""
  if not clips:
    return {}
  widths = {clip.shape[1:] for clip in clips}
  if len(widths) != 1 or any(clip.ndim != 2 or not len(clip) for clip in clips):
    raise TemplateError(f"speech clips of shapes {[clip.shape for clip in clips]}: expected "
                        "[frames >= 1, F] each, one F")
  return dict(speech_features=np.concatenate(clips).astype(np.float32),
              speech_lengths=np.asarray([len(clip) for clip in clips], np.int32))


class ChatTemplate:
  """Turns conversations into `Sample`s for one tokenizer, vocabulary and image size."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, vocab: Vocab, image_lengths: ImageLengths):
    self.tokenizer = tokenizer
    self.vocab = vocab
    self.image_lengths = image_lengths
    self._newline = self._text_ids("\n")
    self._roles = {role: self._text_ids(role) for role in ROLES}

  @classmethod
  def from_file(cls, tokenizer_json: str, vocab: Vocab, image_lengths: ImageLengths) -> ChatTemplate:
    try:
      check_regular_file(tokenizer_json)  # /dev/zero would be read forever
      tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception for missing and malformed files
      raise TemplateError(f"{tokenizer_json}: not a readable tokenizer.json ({e})") from None
    return cls(tokenizer, vocab, image_lengths)

  def _text_ids(self, text: str) -> list[int]:
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    outside = [i for i in ids if not 0 <= i < self.vocab.text_size]
    if outside:
      raise TemplateError(f"text {text[:40]!r} tokenizes to id {outside[0]} outside the text range "
                          f"[0, {self.vocab.text_size}): tokenizer and vocabulary do not match")
    return ids

  def encode(self, task: str, messages: Sequence[dict], image_codes: Sequence = (),
             speech_codes: Sequence = (), speech_clips: Sequence[np.ndarray] = ()) -> Sample:
    """Messages [{role, content}] + media code lists (in order of appearance) -> Sample. With
    `speech_clips` (features [frames, F] each), the `<|audio|>` placeholders before the
    assistant turn take them in order, and only the assistant's take `speech_codes`."""
    task_index(task)
    if not messages or messages[-1].get("role") != "assistant":
      raise TemplateError("the conversation must end with an assistant turn (the response)")
    images, speeches = list(image_codes), list(speech_codes)
    clips = [np.asarray(clip, dtype=np.float32) for clip in speech_clips]
    fields = speech_fields(clips)
    # None: the user's speech is discrete codes too
    queue = list(clips) if clips else None
    ids: list[int] = []
    response_start = 0
    for number, message in enumerate(messages):
      role, content = message.get("role"), message.get("content")
      if role not in ROLES:
        raise TemplateError(f"message {number}: role {quoted(role)} is not one of {ROLES}")
      if role == "system" and number:
        raise TemplateError(f"message {number}: a system message may only come first")
      if not isinstance(content, str):
        raise TemplateError(f"message {number}: content must be a string")
      ids += [self.vocab.im_start_id, *self._roles[role], *self._newline]
      response_start = len(ids)
      ids += self._content_ids(number, role, content, images, speeches, queue)
      ids += [self.vocab.im_end_id, *self._newline]
    if images or speeches or queue:
      clips_left = f" and {len(queue)} speech clips" if queue else ""
      raise TemplateError(f"{len(images)} image and {len(speeches)} speech code lists"
                          f"{clips_left} were not consumed by any placeholder")
    return Sample(task, np.asarray(ids, dtype=np.int32), response_start, fields)

  def _content_ids(self, number: int, role: str, content: str, images: list,
                   speeches: list, clips: list | None) -> list[int]:
    ids: list[int] = []
    for piece in _PLACEHOLDER_SPLIT.split(content):
      if piece == IMAGE:
        ids += self._media(number, "image", images, self.image_lengths.for_role(role))
      elif piece == AUDIO and role != "assistant" and clips is not None:
        ids += self._clip(number, clips)
      elif piece == AUDIO:
        ids += self._media(number, "speech", speeches, None)
      elif piece:
        special = next((token for token in SPECIAL_TOKENS if token in piece), None)
        if special:
          raise TemplateError(f"message {number}: content contains the special token {special} "
                              f"outside a placeholder")
        ids += self._text_ids(piece)
    return ids

  def _clip(self, number: int, clips: list) -> list[int]:
    if not clips:
      raise TemplateError(f"message {number}: speech placeholder has no speech clip left")
    frames = len(clips.pop(0))
    return [self.vocab.begin_audio_id, *[self.vocab.audio_context_id] * speech_placeholders(frames),
            self.vocab.end_audio_id]

  def _media(self, number: int, kind: str, queue: list, expected: int | None) -> list[int]:
    if not queue:
      raise TemplateError(f"message {number}: {kind} placeholder has no {kind} codes left")
    codes = queue.pop(0)
    if expected is not None and len(codes) != expected:
      raise TemplateError(f"message {number}: image has {len(codes)} codes, expected {expected}")
    if not len(codes):
      raise TemplateError(f"message {number}: empty {kind} code list")
    try:
      if kind == "image":
        return [self.vocab.begin_image_id, *self.vocab.image_ids(codes), self.vocab.end_image_id]
      return [self.vocab.begin_audio_id, *self.vocab.speech_ids(codes), self.vocab.end_audio_id]
    except (ValueError, TypeError) as e:
      raise TemplateError(f"message {number}: {e}") from None

  def readable(self, ids, max_codes: int = 6) -> str:
    """Ids -> text with specials spelled out and code runs abbreviated (for humans)."""
    ids = np.asarray(ids)
    modality = self.vocab.modality(ids)
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
      if end < len(ids) and modality[end] == modality[start] and modality[start] != Modality.SPECIAL:
        continue
      run = ids[start:end]
      if modality[start] == Modality.TEXT:
        parts.append(self.tokenizer.decode(run.tolist(), skip_special_tokens=False))
      elif modality[start] == Modality.SPECIAL:
        parts.append(SPECIAL_TOKENS[int(run[0]) - self.vocab.text_size])
      else:
        kind = "speech" if modality[start] == Modality.SPEECH else "image"
        offset = self.vocab.speech_offset if kind == "speech" else self.vocab.image_offset
        codes = (run - offset).tolist()
        shown = " ".join(map(str, codes[:max_codes])) + (" ..." if len(codes) > max_codes else "")
        parts.append(f"[{len(codes)} {kind} codes: {shown}]")
      start = end
    return "".join(parts)
