"""Attention kernels: Pallas flash attention (TPU Mosaic / GPU Triton), splash, cuDNN, and the
shard_map wrapper the model dispatch uses."""

from omnijax.kernels.flash import flash_attention
from omnijax.kernels.splash import splash_attention

__all__ = ["flash_attention", "splash_attention"]
