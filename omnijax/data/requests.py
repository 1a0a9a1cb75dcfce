"""The system and user turns of every task: what a request to the model looks like (§2.4).

The toy world's training conversations and `omnijax generate` both build their prompts here,
so a generated request is templated exactly like the training data.
"""

from __future__ import annotations

from omnijax.data import tasks
from omnijax.data.templates import AUDIO, IMAGE

DEFAULT_CAPTION_PROMPT = "Describe the image."
# Which inputs each task reads: text (the caption to draw, the question, the text to speak),
# an image, speech.
INPUTS: dict[str, tuple[str, ...]] = {
    "t2i": ("text",), "caption": ("image",), "vqa": ("text", "image"), "asr": ("speech",),
    "tts": ("text",), "s2i": ("speech",), "svqa": ("speech", "image"),
}


def _user(content: str) -> dict:
  return {"role": "user", "content": content}


def _system(content: str) -> dict:
  return {"role": "system", "content": content}


def request_messages(task: str, text: str | None = None) -> list[dict]:
  """The turns before the assistant's. Media enter as placeholders, filled in order: for svqa
  the spoken question, then the image."""
  tasks.task_index(task)
  if "text" in INPUTS[task] and not text:
    raise ValueError(f"task {task} needs a text input")
  by_task = {
      "t2i": lambda: [_user(f"{tasks.T2I_PROMPT}\n{text}")],
      "caption": lambda: [_user(f"{text or DEFAULT_CAPTION_PROMPT}\n{IMAGE}")],
      "vqa": lambda: [_user(f"{text}\n{IMAGE}")],
      "asr": lambda: [_user(f"{tasks.ASR_PROMPT}\n{AUDIO}")],
      "tts": lambda: [_user(f"{tasks.TTS_PROMPT}\n{text}")],
      "s2i": lambda: [_system(tasks.S2I_SYSTEM), _user(AUDIO)],
      "svqa": lambda: [_system(tasks.SVQA_SYSTEM), _user(f"{AUDIO}\n{IMAGE}")],
  }
  return by_task[task]()


def unconditional_messages(task: str) -> list[dict]:
  """The request with its conditioning removed, for classifier-free guidance: the release's S2I
  form (the system turn and an empty user turn); t2i keeps its instruction without a caption."""
  if task == "t2i":
    return [_user(f"{tasks.T2I_PROMPT}\n")]
  return [m for m in request_messages(task, text="-") if m["role"] == "system"] + [_user("")]
