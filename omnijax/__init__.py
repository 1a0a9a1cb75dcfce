"""omnijax: Omni-Diffusion (mask-based discrete diffusion, any-to-any) in JAX/Flax NNX."""

__version__ = "0.1.0"
