"""The unified token vocabulary: the one owner of every token id in omnijax.

Layout (release, `Vocab.omni_diffusion()`; reference §2):

    [0, text_size)                      byte-level BPE text tokens
    [text_size, text_size + 45)         specials: <|endoftext|>, ChatML, Dream's <|mask|>, the
                                        multimodal markers (same order as the release)
    [speech_offset, + n_speech_codes)   GLM-4-Voice speech codes  (<|audio_k|>)
    [image_offset,  + n_image_codes)    MAGVIT-v2 image codes     (<|image_k|>)

`Vocab.compact(...)` keeps exactly this order and the specials' relative offsets, so small models
share every rule (templates, masking, sampler) with the 7B layout; only the three sizes change.
`Vocab.text_only(text_size)` has no speech or image codes: a text checkpoint (e.g. Dream-7B)
imported as it is, before `omnijax convert --grow-vocab` adds the code rows.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from omnijax.messages import quoted

# Specials in release order, as offsets from the first special id (151643 in the release).
# Unused release markers keep their slots so that compact layouts map 1:1 onto the release.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # +0 pad / eos
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|beginoftext|>",  # +22 Dream bos (never inserted)
    "<|mask|>",  # +23 the diffusion mask
    "<|begin_of_image|>",  # +24
    "<|end_of_image|>",
    "<|context_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|context_of_video|>",
    "<|begin_of_patch|>",
    "<|end_of_patch|>",
    "<|context_of_patch|>",
    "<|begin_of_quad|>",
    "<|end_of_quad|>",
    "<|begin_of_ref|>",
    "<|end_of_ref|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",  # +39 raw-data placeholder
    "<|video|>",
    "<|begin_of_audio|>",  # +41
    "<|end_of_audio|>",
    "<|context_of_audio|>",
    "<|audio|>",  # +44 raw-data placeholder
)
RELEASE_TEXT_SIZE = 151643
RELEASE_SPEECH_CODES = 16384
RELEASE_IMAGE_CODES = 8192


class Modality(enum.IntEnum):
  TEXT = 0
  SPECIAL = 1
  SPEECH = 2
  IMAGE = 3


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Token-id layout. Build with `omni_diffusion()` or `compact(...)`, not directly."""

  text_size: int
  n_speech_codes: int
  n_image_codes: int

  def __post_init__(self):
    for name in ("text_size", "n_speech_codes", "n_image_codes"):
      value = getattr(self, name)
      smallest = 1 if name == "text_size" else 0
      if not isinstance(value, (int, np.integer)) or value < smallest:
        raise ValueError(f"Vocab.{name} must be an integer >= {smallest}, got {value!r}")

  @classmethod
  def omni_diffusion(cls) -> Vocab:
    """The released Omni-Diffusion layout (176,264 ids), so released weights load unchanged."""
    return cls(RELEASE_TEXT_SIZE, RELEASE_SPEECH_CODES, RELEASE_IMAGE_CODES)

  @classmethod
  def compact(cls, text_size: int, *, n_image_codes: int, n_speech_codes: int) -> Vocab:
    """A small layout with the release's specials and order, for small models and the toy world."""
    return cls(text_size, n_speech_codes=n_speech_codes, n_image_codes=n_image_codes)

  @classmethod
  def text_only(cls, text_size: int) -> Vocab:
    """Text tokens and the specials, no code ranges."""
    return cls(text_size, n_speech_codes=0, n_image_codes=0)

  # --- ids --------------------------------------------------------------------------------------
  def special_id(self, token: str) -> int:
    try:
      return self.text_size + SPECIAL_TOKENS.index(token)
    except ValueError:
      raise KeyError(f"{token!r} is not a special token of the omnijax vocabulary") from None

  @property
  def special_tokens(self) -> dict[str, int]:
    return {token: self.text_size + i for i, token in enumerate(SPECIAL_TOKENS)}

  @property
  def pad_id(self) -> int:
    return self.special_id("<|endoftext|>")

  @property
  def im_start_id(self) -> int:
    return self.special_id("<|im_start|>")

  @property
  def im_end_id(self) -> int:
    return self.special_id("<|im_end|>")

  @property
  def mask_id(self) -> int:
    return self.special_id("<|mask|>")

  @property
  def begin_image_id(self) -> int:
    return self.special_id("<|begin_of_image|>")

  @property
  def end_image_id(self) -> int:
    return self.special_id("<|end_of_image|>")

  @property
  def image_placeholder_id(self) -> int:
    return self.special_id("<|image|>")

  @property
  def begin_audio_id(self) -> int:
    return self.special_id("<|begin_of_audio|>")

  @property
  def end_audio_id(self) -> int:
    return self.special_id("<|end_of_audio|>")

  @property
  def audio_placeholder_id(self) -> int:
    return self.special_id("<|audio|>")

  @property
  def audio_context_id(self) -> int:
    """The placeholder that a continuous speech frame's embedding overwrites."""
    return self.special_id("<|context_of_audio|>")

  @property
  def speech_offset(self) -> int:
    return self.text_size + len(SPECIAL_TOKENS)

  @property
  def image_offset(self) -> int:
    return self.speech_offset + self.n_speech_codes

  @property
  def size(self) -> int:
    return self.image_offset + self.n_image_codes

  # --- codes <-> ids ----------------------------------------------------------------------------
  def speech_ids(self, codes) -> np.ndarray:
    """GLM-4-Voice codes -> token ids."""
    return self._codes_to_ids(codes, self.speech_offset, self.n_speech_codes, "speech")

  def image_ids(self, codes) -> np.ndarray:
    """MAGVIT-v2 codes -> token ids."""
    return self._codes_to_ids(codes, self.image_offset, self.n_image_codes, "image")

  def speech_codes(self, ids) -> np.ndarray:
    """Token ids -> GLM-4-Voice codes; every id must be a speech id."""
    return self._ids_to_codes(ids, self.speech_offset, self.n_speech_codes, "speech")

  def image_codes(self, ids) -> np.ndarray:
    """Token ids -> MAGVIT-v2 codes; every id must be an image id."""
    return self._ids_to_codes(ids, self.image_offset, self.n_image_codes, "image")

  @staticmethod
  def _codes_to_ids(codes, offset: int, count: int, what: str) -> np.ndarray:
    if not isinstance(codes, np.ndarray) or codes.dtype == object:
      codes = Vocab._exact_codes(codes, count, what)
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
      raise TypeError(f"{what} codes must be integers, got dtype {codes.dtype}")
    bad = (codes < 0) | (codes >= count)
    if bad.any():
      index = int(np.argmax(bad.ravel()))
      raise ValueError(
          f"{what} code {int(codes.ravel()[index])} at index {index} is outside [0, {count})")
    return (codes.astype(np.int64) + offset).astype(np.int32)

  @staticmethod
  def _exact_codes(codes, count: int, what: str) -> np.ndarray:
    """Python numbers (a JSON list), checked one by one before numpy sees them: it would turn
    an integer beyond int64 into an object array, and one beyond 2**63 beside small ones into
    floats."""

    items = codes.ravel().tolist() if isinstance(codes, np.ndarray) else list(codes)
    for index, code in enumerate(items):
      if isinstance(code, bool) or not isinstance(code, (int, np.integer)):
        raise TypeError(f"{what} code {quoted(code)} at index {index} is not an integer")
      if not 0 <= code < count:
        raise ValueError(f"{what} code {quoted(code)} at index {index} is outside [0, {count})")
    return np.asarray(items, np.int64)

  @staticmethod
  def _ids_to_codes(ids, offset: int, count: int, what: str) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    bad = (ids < offset) | (ids >= offset + count)
    if bad.any():
      index = int(np.argmax(bad.ravel()))
      raise ValueError(f"id {int(ids.ravel()[index])} at index {index} is not a {what} id "
                       f"(expected [{offset}, {offset + count}))")
    return (ids - offset).astype(np.int32)

  # --- modality ---------------------------------------------------------------------------------
  def modality(self, ids):
    """Modality of each id (array in, array of `Modality` values out; a Python int gives one)."""
    array = np.asarray(ids, dtype=np.int64)
    self.check_ids(array)
    out = np.select(
        [array < self.text_size, array < self.speech_offset, array < self.image_offset],
        [Modality.TEXT, Modality.SPECIAL, Modality.SPEECH],
        Modality.IMAGE,
    ).astype(np.int8)
    return Modality(int(out)) if np.ndim(ids) == 0 else out

  def check_ids(self, ids, where: str = "") -> None:
    """Raises ValueError naming the first id outside [0, size)."""
    array = np.asarray(ids, dtype=np.int64)
    bad = (array < 0) | (array >= self.size)
    if bad.any():
      index = int(np.argmax(bad.ravel()))
      prefix = f"{where}: " if where else ""
      raise ValueError(f"{prefix}token id {int(array.ravel()[index])} at index {index} is outside "
                       f"the vocabulary [0, {self.size})")

  def describe(self) -> dict[str, int]:
    """The layout as plain numbers (for manifests, checkpoints and `omnijax info`)."""
    return dict(size=self.size, text_size=self.text_size, pad_id=self.pad_id,
                mask_id=self.mask_id, speech_offset=self.speech_offset,
                n_speech_codes=self.n_speech_codes, image_offset=self.image_offset,
                n_image_codes=self.n_image_codes)
