"""Every setting of one decode, in one frozen object, validated once.

The per-task table (omnijax.generate.settings) fills one, `omnijax generate` flags and `omnijax
eval` step counts change it with `replace`, and the sampler reads it; `sample(...)` and
`sample_with_stats(...)` take the same names as keyword arguments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from omnijax.config import SAMPLER_ALGS, SAMPLER_CACHES


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """canvas: mask tokens decoded after each prompt; steps: the step budget (`min(steps,
  canvas)` on the release's schedule; with `threshold`, the ceiling); alg: the confidence
  (maskgit_plus: the chosen token's probability, topk_margin: top-1 minus top-2, entropy:
  negative entropy); temperature 0 is greedy; top_p (Dream's nucleus), top_k (0: off);
  repeat_penalty and position_penalty: CTRL-style factors (1: off); cfg: classifier-free guidance
  weight (0: off); block_size > 0: semi-autoregressive blocks; threshold: commit every masked
  position more confident than it (at least one a step); prefill: (canvas offset, token id)
  pairs written before decoding (a {offset: id} mapping is accepted); seed: sampling seed;
  cache: "none", "prefix" (the prompt's keys and values reused between refreshes) or "dual"
  (the keys and values of every column outside the current block reused: prompt and canvas);
  cache_refresh: with a cache, refresh it every this many steps of a block (0: only at a
  block's first step; 1: every step, the uncached result)."""

  canvas: int
  steps: int
  alg: str = "maskgit_plus"
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  repeat_penalty: float = 1.0
  position_penalty: float = 1.0
  cfg: float = 0.0
  block_size: int = 0
  threshold: float | None = None
  prefill: tuple[tuple[int, int], ...] = ()
  seed: int = 0
  cache: str = "none"
  cache_refresh: int = 0

  def __post_init__(self):
    prefill = self.prefill.items() if isinstance(self.prefill, Mapping) else self.prefill or ()
    object.__setattr__(self, "prefill", tuple((int(offset), int(token))
                                              for offset, token in prefill))
    canvas, steps = self.canvas, self.steps
    checks = [
        (_is_int(canvas) and canvas >= 1, f"canvas={canvas!r} must be an integer >= 1"),
        (_is_int(steps) and steps >= 1, f"steps={steps!r} must be an integer >= 1"),
        (self.alg in SAMPLER_ALGS, f"alg={self.alg!r} is not one of {SAMPLER_ALGS}"),
        (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
        (0 < self.top_p <= 1, f"top_p={self.top_p} must lie in (0, 1]"),
        (self.top_k >= 0, f"top_k={self.top_k} must be >= 0"),
        (self.repeat_penalty > 0, f"repeat_penalty={self.repeat_penalty} must be > 0"),
        (self.position_penalty > 0, f"position_penalty={self.position_penalty} must be > 0"),
        (self.cfg >= 0, f"cfg={self.cfg} must be >= 0"),
        (_is_int(self.block_size) and self.block_size >= 0,
         f"block_size={self.block_size!r} must be an integer >= 0"),
        (self.threshold is None or math.isfinite(self.threshold),
         f"threshold={self.threshold} must be finite"),
        (self.cache in SAMPLER_CACHES, f"cache={self.cache!r} is not one of {SAMPLER_CACHES}"),
        (_is_int(self.cache_refresh) and self.cache_refresh >= 0,
         f"cache_refresh={self.cache_refresh!r} must be an integer >= 0"),
    ]
    checks += [(0 <= offset < (canvas if _is_int(canvas) else 0),
                f"prefill offset {offset} is outside the canvas [0, {canvas})")
               for offset, _ in self.prefill]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  def replace(self, **changes) -> DecodeSettings:
    """A copy with `changes` applied; a change whose value is None keeps the current value (so
    unset command-line flags pass straight through)."""
    unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f"unknown decode setting {unknown[0]!r}")
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
