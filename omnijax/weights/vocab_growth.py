"""Importing a text checkpoint into a bigger token layout (Dream-7B -> the Omni-Diffusion ids).

Dream-7B's 152,064 rows hold Qwen2.5's text tokens and specials with `<|mask|>` at 151,666, the
same ids as the release layout's first rows; the release adds 24,200 rows (the remaining
specials, 16,384 speech and 8,192 image codes). Growing keeps every existing embedding row and
lm_head column bit-exact, so the logits of the old ids are unchanged, and draws the new ones from
a Gaussian with the mean and covariance of the existing text rows (Hewitt, "Initializing new word
embeddings", 2021): new tokens start where the model already puts text, not at a random scale.
The draws are seeded, so the same command gives the same checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from omnijax.config import ModelConfig, VocabConfig
from omnijax.vocab import SPECIAL_TOKENS

# Rows per block when accumulating the covariance (bounds the float64 copy of the rows).
_STATS_BLOCK_ROWS = 8192


class VocabGrowthError(ValueError):
  """The checkpoint cannot be grown into the requested layout; the message says why."""


def text_layout(hf: dict) -> VocabConfig:
  """The text-only layout of a Qwen2/Dream config.json whose size matches no omnijax layout.

  `<|endoftext|>` opens the specials: its id is the text size. It is found from `mask_token_id`
  (Dream), else `pad_token_id` or `bos_token_id` (Qwen2's `<|endoftext|>`); if none of them
  leaves room for the specials, every row but the last len(SPECIAL_TOKENS) counts as text.
  """
  rows = int(hf["vocab_size"])
  candidates = []
  if hf.get("mask_token_id") is not None:
    candidates.append(int(hf["mask_token_id"]) - SPECIAL_TOKENS.index("<|mask|>"))
  candidates += [int(hf[key]) for key in ("pad_token_id", "bos_token_id")
                 if isinstance(hf.get(key), int)]
  fitting = [size for size in candidates if 1 <= size <= rows - len(SPECIAL_TOKENS)]
  text_size = fitting[0] if fitting else rows - len(SPECIAL_TOKENS)
  if text_size < 1:
    raise VocabGrowthError(f"vocab_size {rows} is too small for omnijax's "
                           f"{len(SPECIAL_TOKENS)} special tokens")
  return VocabConfig(layout="text", text_size=text_size, n_image_codes=0, n_speech_codes=0)


def grow_rows(existing: np.ndarray, total_rows: int, stats_rows: int,
              rng: np.random.Generator) -> np.ndarray:
  """[n, d] -> [total_rows, d]: the n rows unchanged, the new ones ~ N(mean, cov) of the first
  `stats_rows` rows."""
  rows, width = existing.shape
  total = np.zeros(width, np.float64)
  second_moment = np.zeros((width, width), np.float64)
  for start in range(0, stats_rows, _STATS_BLOCK_ROWS):
    block = existing[start:min(start + _STATS_BLOCK_ROWS, stats_rows)].astype(np.float64)
    total += block.sum(axis=0)
    second_moment += block.T @ block
  mean = total / stats_rows
  covariance = (second_moment - stats_rows * np.outer(mean, mean)) / max(stats_rows - 1, 1)
  # eigh tolerates the (numerically) singular covariance of few or collinear rows.
  new = rng.multivariate_normal(mean, covariance, size=total_rows - rows, method="eigh",
                                check_valid="ignore")
  return np.concatenate([existing, new.astype(existing.dtype)], axis=0)


@dataclasses.dataclass(frozen=True)
class VocabGrowth:
  """How one checkpoint's vocabulary rows become the target layout's."""

  source_rows: int
  target: ModelConfig
  seed: int = 0

  @classmethod
  def plan(cls, source: ModelConfig, layout: VocabConfig, seed: int = 0) -> VocabGrowth:
    """Checks that `source`'s ids are a prefix of `layout`'s and returns the target config."""
    source_vocab, target_vocab = source.vocab.build(), layout.build()
    if source_vocab.text_size != target_vocab.text_size:
      raise VocabGrowthError(
          f"the checkpoint's special tokens start at id {source_vocab.text_size} (its "
          f"<|endoftext|>), the layout's at {target_vocab.text_size}: the ids would not line up")
    if source.vocab_size >= target_vocab.size:
      raise VocabGrowthError(
          f"the checkpoint already has {source.vocab_size} rows, not fewer than the layout's "
          f"{target_vocab.size}; import it with --vocab instead of --grow-vocab")
    target = dataclasses.replace(source, vocab=layout, embedding_rows=None)
    return cls(source.vocab_size, target, seed)

  def reader(self, read: Callable[[tuple[str, ...], tuple[int, ...]], np.ndarray]):
    """Wraps a `read(path, shape)` of target shapes so that the embedding and the lm_head are
    read at the checkpoint's size and grown."""
    target_rows = self.target.vocab_size
    stats_rows = self.target.vocab.text_size
    # One stream per tensor, so adding or tying the lm_head does not change the embedding.
    embed_rng, head_rng = (np.random.default_rng(s)
                           for s in np.random.SeedSequence(self.seed).spawn(2))

    def grown_read(keys: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
      if keys == ("embed_tokens",):
        rows = read(keys, (self.source_rows, shape[1]))
        return grow_rows(rows, target_rows, stats_rows, embed_rng)
      if keys == ("lm_head",):  # [d, V]: grow the columns
        columns = read(keys, (shape[0], self.source_rows)).T
        return np.ascontiguousarray(grow_rows(columns, target_rows, stats_rows, head_rng).T)
      return read(keys, shape)

    return grown_read
