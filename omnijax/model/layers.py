"""Building blocks shared by the backbone and the speech encoder: the 2-D matmul and the dense
layer (parameters in param dtype with logical axes, computed in compute dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out] as one 2-D matmul: XLA:CPU computes the weight gradient of a 3-D
  dot (contracting batch and length together) about 2x slower than the 2-D equivalent; on TPU
  merging the leading dims is free."""
  return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def normal_param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class Dense(nnx.Module):
  """x @ kernel (+ bias), kernel stored [in, out] in param dtype, computed in compute dtype.
  `config` is any config with `compute_dtype`, `param_dtype` and `init_std` (the backbone's
  ModelConfig, the speech encoder's SpeechEncoderConfig)."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *, bias: bool,
               config, rngs: nnx.Rngs):
    self.compute_dtype = jnp.dtype(config.compute_dtype)
    param_dtype = jnp.dtype(config.param_dtype)
    self.kernel = normal_param(rngs, (in_features, out_features), axes, config.init_std,
                               param_dtype)
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
                 if bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = matmul(x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    return y
