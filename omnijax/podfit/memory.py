"""The analytic minimum of per-chip training memory: the yardstick that `omnijax compile`,
`omnijax scaling` and docs/pod_fit.md hold the compiled peak against.

    analytic minimum per chip =
        sum over parameters p of  bytes(p) x (1 + [p trainable] x (1 + moments(p))) / shards(p)
      + num_layers x rows per chip x seq_len x kept(remat policy) x bytes(compute dtype)

The first line is the training state: the fp32 parameter, its fp32 gradient (under gradient
accumulation that buffer is the accumulator) and the optimizer's fp32 moments (AdamW's two; Muon's
one momentum for the matrices it orthogonalises), each divided over the chips its PartitionSpec
shards it on (frozen parameters have neither gradient nor moments). The
second is what the backward pass cannot recompute: per layer and token, the values the remat
policy saves (`kept_per_token`), for one micro-batch of `rows per chip` rows. Everything above
this — one layer's recomputed activations, the loss's logits chunk, gradients in flight,
collective buffers, XLA's scheduling — is overhead, measured by `peak / analytic minimum`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from omnijax.config import Config, ModelConfig
from omnijax.train.optimizer import moment_buffers
from omnijax.train.state import StateLayout
from omnijax.sharding import shard_count


def kept_per_token(model: ModelConfig, tensor: int) -> float:
  """Values per token and layer that `model.remat` saves for the backward pass, per chip.

  Head- and MLP-sized values are split over the tensor axis; the layer input (the scan carry)
  is kept under every policy.
  """
  d, f = model.hidden_size, model.mlp_size
  q = model.num_heads * model.resolved_head_dim
  kv = model.num_kv_heads * model.resolved_head_dim
  projections = (q + 2 * kv) / tensor  # query_proj, key_proj, value_proj
  attention_out = q / tensor
  kept = {
      "full": d,
      "save_attention_out": d + attention_out,
      "save_dots_except_mlp": d + projections + attention_out + d,  # + out_proj
      # every matmul output: q/k/v, o_proj, gate, up, down
      "save_dots": d + projections + d + 2 * f / tensor + d,
  }
  # No remat keeps at least everything the dots policy keeps, the attention output and the
  # MLP hidden state.
  kept["none"] = kept["save_dots"] + attention_out + f / tensor
  return kept[model.remat]


# The continuous speech input's modules (omnijax.model.transformer's attribute names).
SPEECH_MODULES = ("speech_encoder", "speech_projector")


@dataclasses.dataclass(frozen=True)
class AnalyticMemory:
  params_per_chip: int  # parameter elements stored on one chip
  state_bytes: int  # parameters + gradients + optimizer moments, per chip
  activation_bytes: int  # what the remat policy keeps for one micro-batch, per chip
  # the speech encoder's and projector's share of the first two (0 without an encoder); the
  # frozen encoder's forward keeps nothing for a backward pass, so no activations are kept
  speech_params_per_chip: int = 0
  speech_state_bytes: int = 0

  @property
  def total_bytes(self) -> int:
    return self.state_bytes + self.activation_bytes


def analytic_minimum(config: Config, mesh, stage: str) -> AnalyticMemory:
  """The analytic minimum (module docstring) of `stage`'s train step on `mesh`."""
  layout = StateLayout.create(config, mesh)
  labels = layout.trainable(config.train.stages[stage])
  params_per_chip = state_bytes = speech_params = speech_bytes = 0
  moments = moment_buffers(config.train.optimizer, layout.abstract_params)
  for (path, value), sharding, label, moment_count in zip(
      jax.tree_util.tree_leaves_with_path(layout.abstract_params),
      jax.tree.leaves(layout.param_shardings), jax.tree.leaves(labels), jax.tree.leaves(moments)):
    elements = math.prod(sharding.shard_shape(value.shape))
    copies = 1 + (1 + moment_count if label == "train" else 0)  # + gradient and moments
    params_per_chip += elements
    state_bytes += elements * np.dtype(value.dtype).itemsize * copies
    if path[0].key in SPEECH_MODULES:
      speech_params += elements
      speech_bytes += elements * np.dtype(value.dtype).itemsize * copies
  micro_batch = config.data.global_batch_size // config.train.grad_accum_steps
  rows_per_chip = micro_batch / shard_count("batch", mesh)
  activations = (config.model.num_layers * rows_per_chip * config.data.seq_len *
                 kept_per_token(config.model, mesh.shape.get("tensor", 1)) *
                 np.dtype(config.model.compute_dtype).itemsize)
  return AnalyticMemory(int(params_per_chip), int(state_bytes), int(activations),
                        int(speech_params), int(speech_bytes))
