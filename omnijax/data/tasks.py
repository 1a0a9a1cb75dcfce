"""The tasks omnijax trains on, and their fixed instruction texts (reference §2.4).

`TASKS` (defined with the config, which validates mixtures against it) is the one canonical
list: its order defines task indices in shard headers and the `task_ids` batch field.
"""

from omnijax.config import TASKS
from omnijax.messages import quoted

T2I_PROMPT = "Generate an image based on the provided text description."
ASR_PROMPT = "Convert the speech to text."
TTS_PROMPT = "Convert the text to speech."
S2I_SYSTEM = "Please generate an image based on the input audio."
# Sic ("response"): the release trained on this exact string.
SVQA_SYSTEM = "Please response the input audio based on the given image."
# The tasks whose response is an image (generated codes are parsed back to a scene).
IMAGE_TASKS = ("t2i", "s2i")


def task_index(task: str) -> int:
  try:
    return TASKS.index(task)
  except ValueError:
    raise ValueError(f"unknown task {quoted(task)}; known tasks: {', '.join(TASKS)}") from None
