"""`omnijax prepare jsonl`: release-style conversations with pre-tokenized media -> shards.

One JSON object per line: `messages` (or `conversations`) with `<|image|>`/`<|audio|>`
placeholders, `image_codes` and `speech_codes` (lists of code lists, consumed in order of
appearance), and optionally `task`; without it the task is read off the release's fixed prompts.
The release's `audios` (audio file paths, relative to the jsonl file) are continuous speech
input: they fill the `<|audio|>` placeholders before the assistant's turn, as features made with
the model's CMVN statistics (`SpeechInput`), and the assistant's speech stays `speech_codes`.
Every record is validated; the first bad one stops the run with its file and line (and, for
audio, the audio file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Iterable

from omnijax.config import SpeechEncoderConfig
from omnijax.messages import quoted
from omnijax.data import tasks
from omnijax.data.shards import ShardWriter
from omnijax.data.speech_frontend import Cmvn
from omnijax.data.templates import IMAGE, ChatTemplate, clip_tokens


@dataclasses.dataclass(frozen=True)
class SpeechInput:
  """How `audios` become features: the encoder's front end, its CMVN statistics, and the
  sequence length a record with audio must fit."""

  frontend: SpeechEncoderConfig
  cmvn: Cmvn
  seq_len: int
  max_frames: int | None = None  # the most frames a clip may have (data.speech_frames)

  @property
  def clip_frames(self) -> int:
    """The most frames a clip may have: what fits the sequence alone, and max_frames."""
    fits = self.seq_len - clip_tokens(0)
    return fits if self.max_frames is None else min(fits, self.max_frames)


class JsonlError(ValueError):
  """A jsonl record is invalid; the message starts with `file:line`."""


def infer_task(messages: list[dict]) -> str:
  """The task a release conversation trains, from its system prompt or instruction text."""
  by_role = {}
  for message in messages:
    by_role.setdefault(message.get("role"), str(message.get("content", "")))
  system, user = by_role.get("system", ""), by_role.get("user", "")
  if system == tasks.S2I_SYSTEM:
    return "s2i"
  if system == tasks.SVQA_SYSTEM:
    return "svqa"
  for prompt, task in ((tasks.ASR_PROMPT, "asr"), (tasks.TTS_PROMPT, "tts"),
                       (tasks.T2I_PROMPT, "t2i")):
    if user.startswith(prompt):
      return task
  if IMAGE in user:
    return "vqa"  # captioning looks the same; caption data must say "task": "caption"
  raise ValueError("cannot tell the task from the prompts; add a \"task\" field")


def _speech_clips(item: dict, speech: SpeechInput | None, base_dir: pathlib.Path) -> list:
  """The record's `audios` as features, each refusal naming its file."""
  from omnijax.data.audio import audio_features

  paths = item.get("audios", [])
  if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
    raise ValueError("\"audios\" must be a list of audio file paths")
  if paths and speech is None:
    raise ValueError("the record has \"audios\" (continuous speech): pass --cmvn, the speech "
                     "encoder's am.mvn, to prepare them")
  return [audio_features(base_dir / path, speech.frontend, speech.cmvn, speech.clip_frames)
          for path in paths]


def parse_line(line: str, template: ChatTemplate, speech: SpeechInput | None = None,
               base_dir: pathlib.Path = pathlib.Path(".")):
  """One jsonl line -> Sample; raises ValueError (TemplateError, RecordError, AudioError)
  saying why. `audios` paths are relative to `base_dir`."""
  try:
    item = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"not valid JSON: {e}") from None
  if not isinstance(item, dict):
    raise ValueError("a record must be a JSON object")
  messages = item.get("messages", item.get("conversations"))
  if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
    raise ValueError("missing \"messages\": a list of {role, content} objects")
  task = item.get("task") or infer_task(messages)
  if task not in tasks.TASKS:
    raise ValueError(f"unknown task {quoted(task)}; known tasks: {', '.join(tasks.TASKS)}")
  media = {}
  for key in ("image_codes", "speech_codes"):
    lists = item.get(key, [])
    if not isinstance(lists, list) or not all(isinstance(codes, list) for codes in lists):
      raise ValueError(f"\"{key}\" must be a list of code lists")
    media[key] = lists
  clips = _speech_clips(item, speech, base_dir)
  sample = template.encode(task, messages, media["image_codes"], media["speech_codes"], clips)
  if clips and len(sample.tokens) > speech.seq_len:
    raise ValueError(f"with its audio ({', '.join(item['audios'])}) the record takes "
                     f"{len(sample.tokens)} tokens, more than the sequence length "
                     f"{speech.seq_len} (--seq-len)")
  return sample


def _lines(path: pathlib.Path):
  """(line number, text) of a UTF-8 file; a line that is not UTF-8 is an error naming it."""
  with path.open("rb") as lines:
    for number, raw in enumerate(lines, 1):
      try:
        yield number, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise JsonlError(f"{path}:{number}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1})") from None


def prepare_jsonl(inputs: Iterable[str | os.PathLike], writer: ShardWriter,
                  template: ChatTemplate, allow_empty: bool = False,
                  speech: SpeechInput | None = None) -> dict:
  """Templates every line of every input into `writer`; returns the manifest. An input without
  records (most likely the wrong file) is refused unless `allow_empty`; `speech` prepares the
  records' `audios`. On any error the writer is aborted: whatever its output directory held
  before stays as it was."""
  try:
    for path in map(pathlib.Path, inputs):
      records = 0
      for number, line in _lines(path):
        if not line.strip():
          continue
        try:
          writer.write(parse_line(line, template, speech, path.parent))
        except ValueError as e:  # TemplateError and RecordError included
          raise JsonlError(f"{path}:{number}: {e}") from None
        records += 1
      if not records and not allow_empty:
        raise JsonlError(f"{path}: no records (the file is empty or blank); pass --allow-empty "
                         "to write it as an empty split")
  except BaseException:
    writer.abort()
    raise
  return writer.close()
