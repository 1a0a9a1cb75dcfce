"""Forward+backward tokens/s of the `toy` model: omnijax (jit, XLA) vs the same dims in PyTorch.

Both sides run the same bidirectional packed-segment computation on this machine's CPU: the
same batch, sequence length, weights and loss (mean of squared logits stands in for a loss so
both sides do identical work); PyTorch uses transformers' Qwen2 with a 4-D additive mask.

  python benchmarks/forward_backward.py [--batch 4 --seq-len 256 --steps 5] [key=value ...]
"""

from __future__ import annotations

import argparse

from common import time_per_call, torch_inputs, torch_twin

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from omnijax.config import CONFIG_ROOT, load_config  # noqa: E402
from omnijax.model.build import create_model  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()

  import torch

  config = load_config(CONFIG_ROOT / "model" / "toy.yaml", args.overrides).model
  model = create_model(config, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab.build().size, (args.batch, args.seq_len)).astype(np.int32)
  # Packed rows: 4 segments of equal length each.
  segment_ids = np.repeat(np.arange(1, 5), args.seq_len // 4)[None].repeat(args.batch, 0)
  segment_ids = np.pad(segment_ids, ((0, 0), (0, args.seq_len - segment_ids.shape[1])))
  segment_ids = segment_ids.astype(np.int32)

  graphdef, params = nnx.split(model)

  @jax.jit
  def jax_step(params, tokens, segment_ids):
    def loss(params):
      return jnp.mean(nnx.merge(graphdef, params)(tokens, segment_ids) ** 2)
    return jax.value_and_grad(loss)(params)

  jax_tokens, jax_segments = jnp.asarray(tokens), jnp.asarray(segment_ids)
  jax_seconds = time_per_call(
      lambda: jax.block_until_ready(jax_step(params, jax_tokens, jax_segments)), args.steps)

  torch_model = torch_twin(model, config).train()
  input_ids, mask, positions = torch_inputs(tokens, segment_ids)

  def torch_step():
    torch_model.zero_grad(set_to_none=True)
    logits = torch_model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    (logits ** 2).mean().backward()

  torch_seconds = time_per_call(torch_step, args.steps)
  n_tokens = args.batch * args.seq_len
  print(f"config toy ({config.param_count() / 1e6:.1f} M params), batch {args.batch} x "
        f"{args.seq_len} tokens, {jax.device_count()} {jax.default_backend()} device(s), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads")
  print(f"omnijax  fwd+bwd: {jax_seconds * 1e3:8.1f} ms/step  {n_tokens / jax_seconds:9.0f} tokens/s")
  print(f"pytorch  fwd+bwd: {torch_seconds * 1e3:8.1f} ms/step  {n_tokens / torch_seconds:9.0f} tokens/s")
  print(f"ratio omnijax / pytorch tokens/s: {torch_seconds / jax_seconds:.2f}x")


if __name__ == "__main__":
  main()
