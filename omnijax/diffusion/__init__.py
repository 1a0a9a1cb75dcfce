"""Masked diffusion: the training objective and the reverse process (the sampler)."""

from omnijax.diffusion.sampler import sample, sample_with_stats

__all__ = ["sample", "sample_with_stats"]
