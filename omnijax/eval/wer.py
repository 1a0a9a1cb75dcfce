"""Corpus word error rate, normalised like the release's scorer (reference §7.3)."""

from __future__ import annotations

import re
from typing import Sequence

import jiwer

_TAG = re.compile(r"<[^<>]*>")


def normalize(text: str) -> list[str]:
  """Lower-cased words with `<...>` tags removed."""
  return _TAG.sub(" ", text.lower()).split()


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Total edits (substitutions + deletions + insertions) over total reference words, across the
  corpus (not a mean of per-sentence rates). A hypothesis for an empty reference counts its
  words as insertions."""
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
  refs = [" ".join(normalize(r)) for r in references]
  hyps = [" ".join(normalize(h)) for h in hypotheses]
  words = sum(len(r.split()) for r in refs)
  if words == 0:
    raise ValueError("the references hold no words: WER is undefined")
  pairs = [(r, h) for r, h in zip(refs, hyps) if r]
  measured = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
  edits = measured.substitutions + measured.deletions + measured.insertions
  edits += sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
  return edits / words
