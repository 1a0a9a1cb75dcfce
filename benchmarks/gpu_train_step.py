"""Train-step tokens/s and MFU of a model preset on one accelerator: omnijax (per attention
backend) beside its transformers/PyTorch twin, as ratios measured in one run.

omnijax runs `build_train_program`'s step (AdamW, clipping, the diffusion objective,
the preset's remat and compute dtype) on a batch of rows packed with `--segments` equal samples.
The twin is transformers' Qwen2ForCausalLM with the same dims (SDPA attention, a 4-D
block-diagonal mask for the packed rows, bf16 autocast when the preset computes in bf16,
gradient checkpointing) on the same tokens, masked once by omnijax's objective. MFU counts the
analytic FLOPs per token (omnijax.train.flops) against the device's spec-sheet peak and against
a measured matmul rate (a bf16 8192^2 matmul on an accelerator).

  python benchmarks/gpu_train_step.py --preset 1b --attention pallas,cudnn,xla
  python benchmarks/gpu_train_step.py --preset omni7b --attention pallas model.num_layers=4
  python benchmarks/gpu_train_step.py --preset tiny --batch 2 --seq-len 128 --steps 2  # CPU
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import pathlib
import tempfile

# The twin runs first and hands its memory back; JAX then allocates what it needs (preallocating
# 75 % at its first device use would starve the twin of memory).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from common import packed_batch, time_per_call, torch_train_step  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from flax import nnx  # noqa: E402

from omnijax.config import (ATTENTION_BACKENDS, CONFIG_ROOT, ConfigError, MeshConfig,  # noqa: E402
                            load_config)
from omnijax.model.build import create_model  # noqa: E402
from omnijax.sharding import make_mesh  # noqa: E402
from omnijax.train import flops  # noqa: E402
from omnijax.train.program import build_train_program  # noqa: E402
from omnijax.weights import convert  # noqa: E402

PROFILE_STEPS = 3


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="1b", help="a model preset: tpu_configs/model/NAME.yaml")
  parser.add_argument("--attention", default="pallas",
                      help=f"comma-separated backends, each of {ATTENTION_BACKENDS}")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--segments", type=int, default=8, help="samples packed in a row")
  parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up")
  parser.add_argument("--no-twin", dest="twin", action="store_false",
                      help="skip the PyTorch twin (no ratios)")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help=f"write a jax.profiler trace of {PROFILE_STEPS} steps per backend "
                           "to DIR/BACKEND")
  parser.add_argument("overrides", nargs="*", help="config key=value, e.g. model.num_layers=4")
  args = parser.parse_args()
  args.attention = args.attention.split(",")
  for name in args.attention:
    if name not in ATTENTION_BACKENDS:
      parser.error(f"--attention {name!r} is not one of {ATTENTION_BACKENDS}")
  if min(args.batch, args.seq_len, args.segments, args.steps) < 1:
    parser.error("--batch, --seq-len, --segments and --steps must be >= 1")
  if not (CONFIG_ROOT / "model" / f"{args.preset}.yaml").exists():
    presets = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
    parser.error(f"--preset {args.preset!r} is not one of {presets}")
  return args


def _config(args, attention):
  """The preset, stage 1, one batch of batch x seq-len."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": [f"model/{args.preset}.yaml", "topology/single.yaml",
                     "stages/stage1_vision_language.yaml"],
        "data": {"seq_len": args.seq_len, "global_batch_size": args.batch},
    }))
    return load_config(path, [*args.overrides, f"model.attention={attention}"])


def _twin_seconds(args, config, batch):
  """Seconds per step of the transformers twin; frees its device memory before returning."""
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf_config = transformers.Qwen2Config(**convert.config_to_hf(config.model, "float32"))
  model = transformers.Qwen2ForCausalLM._from_config(hf_config, attn_implementation="sdpa")
  model = model.to(device).train()
  # transformers 5 renamed it; 4.x has only the old name.
  getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
  bf16 = config.model.compute_dtype == "bfloat16"
  step = torch_train_step(model, config, batch, device=device,
                          autocast_dtype=torch.bfloat16 if bf16 else None)
  seconds = time_per_call(step, args.steps)
  del model, step
  _free_torch_memory()
  return seconds, f"torch {torch.__version__} ({device})"


def _free_torch_memory():
  """Hands the twin's cached device memory back before JAX allocates."""
  import torch

  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def _jax_seconds(args, config, batch, profile_dir):
  one_device = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  program = build_train_program(config, "stage1", mesh=one_device)
  model = create_model(config.model, program.mesh, seed=0)
  state = [program.init_state(nnx.to_pure_dict(nnx.state(model)), np.int32(20))]
  del model
  device_batch = jax.device_put(batch, program.batch_sharding)

  def step():
    state[0], metrics = program.step(state[0], device_batch)
    jax.block_until_ready(metrics)

  with jax.set_mesh(program.mesh):
    seconds = time_per_call(step, args.steps)
    if profile_dir:
      with jax.profiler.trace(profile_dir):
        for _ in range(PROFILE_STEPS):
          step()
  del state, device_batch
  gc.collect()
  return seconds


def _mfu(rate, per_token, peak):
  return f"{100 * rate * per_token / peak:.1f}" if peak else "n/a"


def main() -> None:
  args = _parse_args()
  logging.basicConfig(format="%(message)s")
  logging.getLogger("omnijax.kernels.attention").setLevel(logging.INFO)  # what `auto` chose
  try:
    configs = {name: _config(args, name) for name in args.attention}
  except ConfigError as e:
    raise SystemExit(f"gpu_train_step: {e}")
  config = configs[args.attention[0]]
  vocab = config.model.vocab.build()
  batch = packed_batch(args.batch, args.seq_len, args.segments, vocab)
  n_tokens = args.batch * args.seq_len

  # The header first and each row as soon as it is measured: a run cut short keeps its rows.
  device = jax.devices()[0]
  compute = jnp.dtype(config.model.compute_dtype)
  spec_peak = flops.PEAK_FLOPS_BY_DEVICE_KIND.get(device.device_kind)
  size = 1024 if device.platform == "cpu" else 8192
  measured = flops.measured_matmul_flops(size, dtype=compute)
  per_token = flops.training_flops_per_token(config.model, args.seq_len)
  report = functools.partial(print, flush=True)
  report(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
  report(f"preset {args.preset} ({config.model.param_count() / 1e6:.1f} M params, "
         f"{config.model.num_layers} layers), batch {args.batch} x {args.seq_len} tokens in rows "
         f"of {args.segments} segments, compute {compute.name}, remat {config.model.remat}")
  report(f"spec peak: {spec_peak / 1e12:.1f} TFLOP/s" if spec_peak else
         f"spec peak: unknown for {device.device_kind!r}")
  report(f"measured matmul rate: {measured / 1e12:.5g} TFLOP/s ({compute.name} {size}^2)")
  report(f"analytic training FLOPs: {per_token / 1e9:.5g} GFLOP/token")

  twin_rate = None

  def report_row(name, seconds):
    rate = n_tokens / seconds
    ratio = f"  ratio {rate / twin_rate:.3f}x pytorch" if twin_rate else ""
    report(f"{name:>16} train step: {seconds * 1e3:10.2f} ms {rate:12.1f} tokens/s  MFU "
           f"{_mfu(rate, per_token, spec_peak)} % of spec, {_mfu(rate, per_token, measured)} % "
           f"of measured{ratio}")

  failed = 0

  def report_failure(name, error):
    nonlocal failed
    failed += 1
    report(f"{name:>16} train step: failed ({type(error).__name__}: "
           f"{str(error).strip().splitlines()[0]})")
    gc.collect()

  # Each side in its own try: one that does not fit or cannot run is reported in one line and
  # the others still run (without the twin, no ratios).
  if args.twin:
    try:
      seconds, twin = _twin_seconds(args, config, batch)
      twin_rate = n_tokens / seconds
      report(f"twin: transformers Qwen2ForCausalLM, SDPA, {twin}")
      report_row("pytorch", seconds)
    except Exception as e:  # noqa: BLE001
      report_failure("pytorch", e)
      _free_torch_memory()
  for name, backend_config in configs.items():
    profile = os.path.join(args.profile, name) if args.profile else None
    try:
      report_row(f"omnijax-{name}", _jax_seconds(args, backend_config, batch, profile))
    except Exception as e:  # noqa: BLE001
      report_failure(f"omnijax-{name}", e)
  if args.profile:
    report(f"profiles: {args.profile}/<backend> (open with TensorBoard's profile plugin or xprof)")
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
