"""Random packed-row segment ids for the kernel tests."""

import numpy as np


def random_segment_ids(rng: np.random.Generator, batch: int, length: int,
                       max_segments: int) -> np.ndarray:
  """[B, L] int32: rows of consecutive segments with ids increasing along the row, some runs
  of padding (id 0) between and after them, and the last row, when B > 1, all padding."""
  rows = []
  for row in range(batch):
    if batch > 1 and row == batch - 1:
      rows.append(np.zeros(length, np.int32))
      continue
    cuts = np.sort(rng.choice(np.arange(1, length), size=max_segments - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [length]]))
    is_padding = rng.random(max_segments) < 0.25
    ids = np.cumsum(~is_padding) * ~is_padding
    rows.append(np.repeat(ids, lengths).astype(np.int32))
  return np.stack(rows)
