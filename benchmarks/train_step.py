"""Train-step tokens/s of the `toy` model: omnijax vs the same dims in transformers/PyTorch.

Same batch (a toy-world batch, masked once by omnijax's objective so both sides see identical
inputs and targets), same weights, AdamW (beta 0.9/0.95) with global-norm clipping at 1.0, fp32,
this machine's CPU. Also prints omnijax's MFU against the measured fp32 matmul rate.

  python benchmarks/train_step.py --data-dir DIR [--steps 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile

from common import time_per_call, torch_train_step, torch_twin

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from omnijax.train.program import build_train_program  # noqa: E402
from omnijax.config import CONFIG_ROOT, load_config  # noqa: E402
from omnijax.data.pipeline import Batches  # noqa: E402
from omnijax.model.build import create_model  # noqa: E402
from omnijax.train import flops  # noqa: E402
from omnijax.train.loop import ensure_data  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--data-dir", default=None, help="toy world (generated here if missing)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()

  import torch

  data_dir = args.data_dir or tempfile.mkdtemp(prefix="toyworld-")
  config = load_config(CONFIG_ROOT / "experiments" / "toy.yaml",
                       [f"data.dir={data_dir}", f"toyworld.dir={data_dir}", "toyworld.scenes=300",
                        *args.overrides])
  ensure_data(config)
  batches = Batches(config.data, config.model.vocab.build())
  batch = next(batches)
  batches.close()

  program = build_train_program(config, "stage1")
  model = create_model(config.model, program.mesh, seed=0)
  torch_model = torch_twin(model, config.model).train()  # before donation consumes the weights
  train_state = [program.init_state(nnx.to_pure_dict(nnx.state(model)), np.int32(20))]

  def jax_step():
    train_state[0], metrics = program.step(train_state[0], batch)
    jax.block_until_ready(metrics)

  jax_seconds = time_per_call(jax_step, args.steps)

  torch_step = torch_train_step(torch_model, config, batch)
  torch_seconds = time_per_call(torch_step, args.steps)
  n_tokens = config.data.global_batch_size * config.data.seq_len
  jax_rate, torch_rate = n_tokens / jax_seconds, n_tokens / torch_seconds
  peak = flops.measured_matmul_flops()
  per_token = flops.training_flops_per_token(config.model, config.data.seq_len)
  print(f"config toy ({config.model.param_count() / 1e6:.1f} M params), batch "
        f"{config.data.global_batch_size} x {config.data.seq_len} tokens, "
        f"{jax.device_count()} {jax.default_backend()} device(s), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads")
  print(f"omnijax  train step: {jax_seconds * 1e3:8.1f} ms  {jax_rate:9.0f} tokens/s")
  print(f"pytorch  train step: {torch_seconds * 1e3:8.1f} ms  {torch_rate:9.0f} tokens/s")
  print(f"ratio omnijax / pytorch tokens/s: {jax_rate / torch_rate:.2f}x")
  print(f"measured fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s; analytic {per_token / 1e6:.1f} "
        f"MFLOP/token -> omnijax MFU {jax_rate * per_token / peak:.1%}, "
        f"pytorch MFU {torch_rate * per_token / peak:.1%}")


if __name__ == "__main__":
  main()
