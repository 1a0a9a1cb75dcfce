"""Evaluation: word error rate and the per-task metrics of `omnijax eval`."""

from omnijax.eval.wer import wer

__all__ = ["wer"]
