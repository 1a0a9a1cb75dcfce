"""Speech encoder and projector weights: FunASR / release tensor names <-> omnijax parameters.

FunASR's SenseVoiceSmall names its tensors `embed.weight` (the query table),
`encoder.encoders0.0.*` (the input block), `encoder.encoders.{i}.*`, `encoder.after_norm.*`,
`encoder.tp_encoders.{i}.*`, `encoder.tp_norm.*` and `ctc.ctc_lo.*`; in each block
`self_attn.linear_q_k_v` (q, k, v fused in that order), `self_attn.linear_out`,
`self_attn.fsmn_block.weight` [d, 1, taps], `feed_forward.w_1`/`w_2`, `norm1`, `norm2`. The
release's checkpoint holds the same names under `model.audio_model.model.` and its
ResamplerProjector under `model.audio_projection.` (`pre_proj_layernorm`, `mlp.0`, `mlp.2`).

Here linears are [in, out] (torch: [out, in]), q/k/v are three linears, the FSMN filter is
[taps, d], and each run of hidden-width blocks is one stacked parameter per tensor (leading
`layers` axis). Conversion is a transpose, a split or a stack: import -> export is bit-exact.
`get(name)` callers of the standalone modules' functions pass FunASR names without the release
prefix; `release_parameter` and `release_tensors` serve a Transformer that holds the encoder
and projector (`speech_encoder/...`, `speech_projector/...`), with the release's full names.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import nnx

from omnijax.config import ModelConfig, SpeechEncoderConfig
from omnijax.model.build import Create, abstract_module, module_from_arrays
from omnijax.model.speech import SpeechEncoder, SpeechProjector
from omnijax.model.transformer import Transformer
from omnijax.sharding import path_str

RELEASE_ENCODER_PREFIX = "model.audio_model.model."
RELEASE_PROJECTOR_PREFIX = "model.audio_projection."
# The Transformer's attributes holding the encoder and projector, and the release's name prefix
# of each.
RELEASE_PREFIXES = {"speech_encoder": RELEASE_ENCODER_PREFIX,
                    "speech_projector": RELEASE_PROJECTOR_PREFIX}
# SenseVoice's CTC head decodes its own transcripts; the release never calls it, so it is not
# part of omnijax's encoder and an import skips these tensors.
UNUSED_ENCODER_PREFIXES = ("ctc.",)

GetTensor = Callable[[str], np.ndarray]


class TensorShapeError(ValueError):
  """A tensor's shape is not the one its parameter needs (`tensor` as `get` was asked for it)."""

  def __init__(self, tensor: str, shape: tuple, expected: tuple, parameter: str):
    super().__init__(f"tensor {tensor}: shape {shape}, expected {expected} for parameter "
                     f"{parameter}")
    self.tensor, self.shape, self.expected, self.parameter = tensor, shape, expected, parameter

_BLOCK_GROUPS = {"input_block": "encoder.encoders0.0", "blocks": "encoder.encoders",
                 "tp_blocks": "encoder.tp_encoders"}
_MODULES = {"queries": "embed", "after_norm": "encoder.after_norm",
            "tp_norm": "encoder.tp_norm", "projector/norm": "pre_proj_layernorm",
            "projector/linear_in": "mlp.0", "projector/linear_out": "mlp.2"}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STACKED = ("blocks", "tp_blocks")  # parameters with a leading layers axis
_QKV = ("linear_q", "linear_k", "linear_v")


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where one omnijax array (one layer's, for stacked blocks) lives in a torch state dict."""

  name: str
  layout: str  # "same"; "kernel": transposed; "fsmn": [d, 1, taps] there, [taps, d] here
  third: int | None = None  # which of q, k, v in a fused linear_q_k_v tensor

  def torch_shape(self, shape: tuple) -> tuple:
    """The tensor's shape for an omnijax array (one layer's) of `shape`."""
    if self.layout == "kernel":
      shape = shape[::-1]
    elif self.layout == "fsmn":
      shape = (shape[1], 1, shape[0])
    if self.third is not None:
      shape = (3 * shape[0], *shape[1:])
    return tuple(shape)

  def to_omnijax(self, tensor: np.ndarray) -> np.ndarray:
    if self.third is not None:
      tensor = np.split(tensor, 3, axis=0)[self.third]
    if self.layout == "kernel":
      return tensor.T
    return tensor[:, 0, :].T if self.layout == "fsmn" else tensor


def _source(path: tuple[str, ...], layer: int | None) -> _Source:
  """The torch tensor behind omnijax parameter `path` (of the encoder, or `projector/...`)."""
  *modules, leaf = path
  layout = "kernel" if leaf == "kernel" else "same"
  if path[0] not in _BLOCK_GROUPS:
    module = "/".join(modules) or leaf  # the query table is a bare parameter
    return _Source(f"{_MODULES[module]}.{_LEAVES.get(leaf, 'weight')}", layout)
  prefix = _BLOCK_GROUPS[path[0]] + ("" if layer is None else f".{layer}")
  local = modules[1:]
  if leaf == "fsmn":
    return _Source(f"{prefix}.self_attn.fsmn_block.weight", "fsmn")
  if local[-1] in _QKV:
    return _Source(f"{prefix}.self_attn.linear_q_k_v.{_LEAVES[leaf]}", layout,
                   _QKV.index(local[-1]))
  return _Source(f"{prefix}.{'.'.join(local)}.{_LEAVES[leaf]}", layout)


def _sources(path: tuple[str, ...], shape: tuple) -> list[_Source]:
  """One source per layer for stacked blocks, else one."""
  if path[0] in _STACKED:
    return [_source(path, layer) for layer in range(shape[0])]
  return [_source(path, None)]


def _read(get: GetTensor, path: tuple[str, ...], shape: tuple) -> np.ndarray:
  """The omnijax array at `path` (of the encoder, or `projector/...`); every tensor's shape is
  checked before it is split or transposed."""
  stacked = path[0] in _STACKED
  layer_shape = tuple(shape[1:] if stacked else shape)
  arrays = []
  for source in _sources(path, shape):
    tensor = np.asarray(get(source.name))
    if tensor.shape != source.torch_shape(layer_shape):
      raise TensorShapeError(source.name, tensor.shape, source.torch_shape(layer_shape),
                             "/".join(path))
    arrays.append(source.to_omnijax(tensor))
  return np.stack(arrays) if stacked else arrays[0]


def encoder_from_tensors(config: SpeechEncoderConfig, get: GetTensor,
                         mesh: jax.sharding.Mesh | None = None) -> SpeechEncoder:
  """An encoder filled from FunASR-named tensors (`get` raises KeyError for a missing one)."""
  return module_from_arrays(lambda rngs: SpeechEncoder(config, rngs),
                            lambda path, shape: _read(get, path, shape), mesh)


def projector_from_tensors(config: ModelConfig, get: GetTensor,
                           mesh: jax.sharding.Mesh | None = None) -> SpeechProjector:
  """A projector filled from ResamplerProjector-named tensors (`mlp.0.weight`, ...)."""
  return module_from_arrays(lambda rngs: SpeechProjector(config, rngs),
                            lambda path, shape: _read(get, ("projector", *path), shape), mesh)


def _parameters(state: nnx.State, prefix: tuple[str, ...]):
  """(omnijax path as _source reads it, variable) for every parameter of `state`."""
  for path, variable in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    yield (*prefix, *path_str(path).split("/")), variable


def _tensors(module: nnx.Module, prefix: tuple[str, ...]) -> dict[str, np.ndarray]:
  """The torch state dict entries of `module`'s parameters, fused q, k, v reassembled."""
  tensors: dict[str, np.ndarray] = {}
  thirds: dict[str, list] = {}
  for keys, variable in _parameters(nnx.state(module, nnx.Param), prefix):
    value = np.asarray(variable.get_value())
    layers = list(value) if keys[0] in _STACKED else [value]
    for source, array in zip(_sources(keys, value.shape), layers):
      if source.layout == "kernel":
        array = array.T
      elif source.layout == "fsmn":
        array = array.T[:, None, :]
      if source.third is None:
        tensors[source.name] = array
      else:
        thirds.setdefault(source.name, [None] * 3)[source.third] = array
  tensors.update({name: np.concatenate(parts, axis=0) for name, parts in thirds.items()})
  return tensors


def _names(create: Create, prefix: tuple[str, ...]) -> set[str]:
  _, state = abstract_module(create)
  return {source.name for keys, variable in _parameters(state, prefix)
          for source in _sources(keys, variable.get_value().shape)}


def encoder_tensors(encoder: SpeechEncoder) -> dict[str, np.ndarray]:
  """FunASR name -> array for every encoder parameter (what encoder_from_tensors reads)."""
  return _tensors(encoder, ())


def projector_tensors(projector: SpeechProjector) -> dict[str, np.ndarray]:
  """ResamplerProjector name -> array (without the release prefix)."""
  return _tensors(projector, ("projector",))


def release_parameter(keys: tuple[str, ...], shape: tuple, get: GetTensor) -> np.ndarray:
  """A Transformer's parameter under `speech_encoder/` or `speech_projector/` (`keys`, e.g.
  ("speech_encoder", "blocks", "norm1", "scale")) from tensors `get` returns by their release
  names; a TensorShapeError names the release tensor."""
  module, *path = keys
  prefix = RELEASE_PREFIXES[module]
  path = tuple(path) if module == "speech_encoder" else ("projector", *path)
  try:
    return _read(lambda name: get(prefix + name), path, shape)
  except TensorShapeError as e:
    raise TensorShapeError(prefix + e.tensor, e.shape, e.expected, "/".join(keys)) from None


def release_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """Release name -> array of the model's speech encoder and projector (none without them)."""
  if model.speech_encoder is None:
    return {}
  tensors = {RELEASE_ENCODER_PREFIX + name: array
             for name, array in encoder_tensors(model.speech_encoder).items()}
  tensors.update({RELEASE_PROJECTOR_PREFIX + name: array
                  for name, array in projector_tensors(model.speech_projector).items()})
  return tensors


def encoder_tensor_names(config: SpeechEncoderConfig) -> set[str]:
  """Every FunASR name encoder_from_tensors reads (allocates nothing): with
  UNUSED_ENCODER_PREFIXES, what tells an import which audio tensors it does not know."""
  return _names(lambda rngs: SpeechEncoder(config, rngs), ())


def projector_tensor_names(config: ModelConfig) -> set[str]:
  return _names(lambda rngs: SpeechProjector(config, rngs), ("projector",))
