"""`omnijax info`: what a config builds — parameter counts, vocabulary, mesh, sharding table."""

from __future__ import annotations

import math

import jax

from omnijax.config import load_config
from omnijax.model.build import abstract_model
from omnijax.sharding import make_mesh, replicated_fraction, sharding_table


def print_info(config_path: str, overrides: list[str]) -> int:
  config = load_config(config_path, overrides)
  model = config.model
  graphdef, abstract_state = abstract_model(model)  # shapes only: works for 7B on a laptop
  mesh = make_mesh(config.mesh)
  rows = sharding_table(abstract_state, mesh)
  counted = sum(math.prod(shape) for _, shape, _, _ in rows)
  if counted != model.param_count():
    raise AssertionError(f"built {counted} parameters but the config formula says "
                         f"{model.param_count()}")
  embedding = model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)
  speech = model.speech_param_count()
  speech_part = f", {speech:,} in the speech encoder and projector" if speech else ""
  print(f"model {model.name}: {counted:,} parameters ({counted - embedding - speech:,} in "
        f"{model.num_layers} layers, {embedding:,} in embeddings{speech_part})")
  print(f"  hidden {model.hidden_size}, heads {model.num_heads} (kv {model.num_kv_heads}, "
        f"head_dim {model.resolved_head_dim}), mlp {model.mlp_size}, rope theta {model.rope_theta:g}")
  print(f"  attention {model.attention}, scan_layers {model.scan_layers}, remat {model.remat}, "
        f"params {model.param_dtype}, compute {model.compute_dtype}")
  if model.speech_encoder is not None:
    encoder = model.speech_encoder
    print(f"  speech encoder: {encoder.feature_size}-d input, {encoder.num_blocks} + "
          f"{encoder.tp_blocks} SANM blocks, hidden {encoder.hidden_size}, heads "
          f"{encoder.num_heads}, mlp {encoder.mlp_size}, FSMN kernel {encoder.fsmn_kernel_size} "
          f"({encoder.param_count():,} parameters, frozen unless a stage sets "
          "freeze_speech_encoder: false)")
  print(f"vocabulary: {model.vocab.build().describe()} (embedding rows {model.vocab_size})")
  print(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} device(s); "
        f"replicated parameter bytes {replicated_fraction(abstract_state, mesh):.2%}")
  width = max(len(name) for name, *_ in rows)
  axes_width = max(34, *(len(str(axes)) + 1 for _, _, axes, _ in rows))
  print(f"{'parameter':<{width}}  {'shape':<22} {'logical axes':<{axes_width}} mesh spec")
  for name, shape, axes, spec in rows:
    print(f"{name:<{width}}  {str(shape):<22} {str(axes):<{axes_width}} {spec}")
  return 0
