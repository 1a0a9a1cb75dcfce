"""`omnijax prepare jsonl`: release-style conversations with pre-tokenized media -> shards.

One JSON object per line: `messages` (or `conversations`) with `<|image|>`/`<|audio|>`
placeholders, `image_codes` and `speech_codes` (lists of code lists, consumed in order of
appearance), and optionally `task`; without it the task is read off the release's fixed prompts.
Every record is validated; the first bad one stops the run with its file and line.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable

from omnijax.messages import quoted
from omnijax.data import tasks
from omnijax.data.shards import ShardWriter
from omnijax.data.templates import IMAGE, ChatTemplate


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


def parse_line(line: str, template: ChatTemplate):
  """One jsonl line -> Sample; raises ValueError (TemplateError, RecordError) saying why."""
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
  return template.encode(task, messages, media["image_codes"], media["speech_codes"])


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
                  template: ChatTemplate, allow_empty: bool = False) -> dict:
  """Templates every line of every input into `writer`; returns the manifest. An input without
  records (most likely the wrong file) is refused unless `allow_empty`. On any error the writer
  is aborted: whatever its output directory held before stays as it was."""
  try:
    for path in map(pathlib.Path, inputs):
      records = 0
      for number, line in _lines(path):
        if not line.strip():
          continue
        try:
          writer.write(parse_line(line, template))
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
