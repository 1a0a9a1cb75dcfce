"""Hugging Face (Qwen2 / Dream layout, safetensors) <-> omnijax weights.

Parameter names map by rule, not by table: the omnijax path joined with '.' under `model.`
(layers indexed), `kernel` -> `weight` transposed ([in, out] here, [out, in] in torch),
RMSNorm `scale` -> `weight`, `bias` -> `bias`; `lm_head` is top level.
Checkpoints are read tensor by tensor and written shard by shard, so a 7B model never needs two
full copies in host memory. Pickle-based checkpoints (.bin/.pt) are refused.

The release's continuous speech input (reference §1.4) travels with the backbone: a checkpoint
holding the SenseVoice encoder and projector (`model.audio_model.model.*`,
`model.audio_projection.*`, as omnijax.model.speech_params maps them) imports into a model with
`speech_encoder` set, and the CMVN statistics (`am.mvn`) beside the tensors go along into the
model directory and back; a checkpoint without them imports without the encoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sys

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from omnijax.config import ConfigError, ModelConfig, SpeechEncoderConfig, VocabConfig, from_dict
from omnijax.data.speech_frontend import CMVN_FILE, FrontendError, read_cmvn
from omnijax.files import (atomic_write, atomic_write_text, output_lock, replace_dir,
                           staging_dir)
from omnijax.messages import quoted
from omnijax.model.build import model_from_arrays
from omnijax.model.speech_params import (RELEASE_ENCODER_PREFIX, RELEASE_PREFIXES,
                                         UNUSED_ENCODER_PREFIXES, TensorShapeError,
                                         release_parameter, release_tensors)
from omnijax.model.transformer import Transformer
from omnijax.sharding import path_str
from omnijax.vocab import Vocab
from omnijax.weights.vocab_growth import VocabGrowth, VocabGrowthError, text_layout

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# config.json `model_type`s of the backbone omnijax implements (Qwen2 and Dream, its diffusion
# variant); others (llama, mistral, ...) differ in ways the tensor names do not show.
SUPPORTED_MODEL_TYPES = ("qwen2", "dream")
# Buffers some exporters write that carry no learned weights.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)
# SenseVoice's CTC head, which the release never calls (omnijax.model.speech_params).
IGNORED_TENSOR_PREFIXES = tuple(RELEASE_ENCODER_PREFIX + prefix
                                for prefix in UNUSED_ENCODER_PREFIXES)
# config.json key (written by to_hf) with the speech encoder's sizes; a checkpoint without it
# holds the release's SenseVoiceSmall.
SPEECH_CONFIG_KEY = "omnijax_speech_encoder"


class CheckpointError(ValueError):
  """A checkpoint directory is missing files, has the wrong tensors, or an unsafe format."""


# --- config -----------------------------------------------------------------------------------


def _rope_theta(hf: dict, where: str) -> float:
  # transformers 4.x writes `rope_theta` at the top level; 5.x nests it in `rope_parameters`.
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type not in (None, "default"):
    raise CheckpointError(f"{where}: RoPE type {quoted(rope_type)} is not supported (default "
                          "RoPE only)")
  theta = hf.get("rope_theta", params.get("rope_theta"))
  if theta is None:
    raise CheckpointError(f"{where}: neither rope_theta nor rope_parameters.rope_theta is set")
  return float(theta)


def _vocab_config(hf: dict, vocab: VocabConfig | None, where: str) -> VocabConfig:
  if vocab is not None:
    return vocab
  if "omnijax_vocab" in hf:
    return VocabConfig(**hf["omnijax_vocab"])
  if hf["vocab_size"] == Vocab.omni_diffusion().size:
    return VocabConfig(layout="omni_diffusion")
  try:
    return text_layout(hf)
  except VocabGrowthError as e:
    raise CheckpointError(f"{where}: {e}") from None


def config_from_hf(hf: dict, vocab: VocabConfig | None = None, where: str = "config.json",
                   **overrides) -> ModelConfig:
  """A Qwen2/Dream `config.json` mapping -> ModelConfig (fp32 params)."""
  missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "vocab_size") if k not in hf]
  if missing:
    raise CheckpointError(f"{where}: missing key {missing[0]}")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{where}: hidden_act {quoted(hf['hidden_act'])} is not supported (silu)")
  model_type = hf.get("model_type", "qwen2")
  if str(model_type).lower() not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"{where}: model_type {quoted(model_type)} is not supported (this "
                          f"backbone is {' / '.join(SUPPORTED_MODEL_TYPES)})")
  windowed = [kind for kind in hf.get("layer_types") or () if kind != "full_attention"]
  if hf.get("use_sliding_window") or windowed:
    raise CheckpointError(f"{where}: sliding-window attention is not supported (full attention "
                          "only; use_sliding_window must be false)")
  fields = dict(
      name=hf.get("_name_or_path") or hf.get("model_type", "hf"),
      vocab=_vocab_config(hf, vocab, where),
      embedding_rows=hf["vocab_size"],
      num_layers=hf["num_hidden_layers"],
      hidden_size=hf["hidden_size"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim"),
      mlp_size=hf["intermediate_size"],
      rope_theta=_rope_theta(hf, where),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ConfigError as e:
    raise CheckpointError(f"{where}: {e}") from None


def config_to_hf(config: ModelConfig, dtype: str) -> dict:
  vocab = config.vocab.build()
  return {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "hidden_size": config.hidden_size,
      "intermediate_size": config.mlp_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.resolved_head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_eps,
      # Both conventions, so transformers 4.x (rope_theta) and 5.x (rope_parameters) read it.
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "max_position_embeddings": 131072,
      "use_sliding_window": False,
      "vocab_size": config.vocab_size,
      "tie_word_embeddings": config.tie_embeddings,
      "bos_token_id": vocab.pad_id,
      "eos_token_id": vocab.pad_id,
      "pad_token_id": vocab.pad_id,
      "mask_token_id": vocab.mask_id,
      "torch_dtype": dtype,
      "omnijax_vocab": {"layout": config.vocab.layout, "text_size": config.vocab.text_size,
                        "n_image_codes": config.vocab.n_image_codes,
                        "n_speech_codes": config.vocab.n_speech_codes},
      **({SPEECH_CONFIG_KEY: dataclasses.asdict(config.speech_encoder)}
         if config.speech_encoder is not None else {}),
  }


# --- names ------------------------------------------------------------------------------------


def hf_name(keys: tuple[str, ...]) -> tuple[str, bool]:
  """omnijax parameter path (layer index included) -> (HF tensor name, transpose?)."""
  *modules, leaf = keys
  if modules == [] and leaf == "lm_head":
    return "lm_head.weight", True
  if modules == [] and leaf == "embed_tokens":
    return "model.embed_tokens.weight", False
  suffix = {"kernel": ("weight", True), "scale": ("weight", False), "bias": ("bias", False)}
  if leaf not in suffix:
    raise KeyError(f"no Hugging Face name for parameter {'/'.join(keys)}")
  name, transpose = suffix[leaf]
  return "model." + ".".join(modules + [name]), transpose


# --- reading ----------------------------------------------------------------------------------


class _TensorIndex:
  """Tensor name -> safetensors file, with lazily opened (memory-mapped) handles."""

  def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
    files = sorted(directory.glob("*.safetensors"))
    if not files:
      unsafe = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
      if unsafe:
        raise CheckpointError(
            f"{directory}: only pickle checkpoints found ({', '.join(unsafe)}); they are refused "
            "because unpickling can run arbitrary code. Convert them to safetensors first "
            "(e.g. transformers' save_pretrained(..., safe_serialization=True)).")
      raise CheckpointError(f"{directory}: no *.safetensors files")
    self._stack = stack
    self._handles: dict[pathlib.Path, object] = {}
    self.location: dict[str, pathlib.Path] = {}
    for file in files:
      for name in self._open(file).keys():
        if name in self.location:
          raise CheckpointError(f"tensor {name} appears in both {self.location[name].name} "
                                f"and {file.name}")
        self.location[name] = file
    self.used: set[str] = set()

  def _open(self, file: pathlib.Path):
    if file not in self._handles:
      try:
        self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="flax"))
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return self._handles[file]

  def tensor(self, name: str) -> np.ndarray:
    """Tensor `name` as stored, in fp32 on the host."""
    if name not in self.location:
      raise CheckpointError(f"tensor {name} is missing from the checkpoint")
    self.used.add(name)
    # framework="flax" because numpy cannot hold bf16; convert to fp32 on the host right away.
    return np.asarray(self._open(self.location[name]).get_tensor(name), dtype=np.float32)

  def read(self, name: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
    tensor = self.tensor(name)
    if transpose:
      tensor = tensor.T
    if tuple(tensor.shape) != tuple(shape):
      raise CheckpointError(f"tensor {name} in {self.location[name].name} has shape "
                            f"{tuple(tensor.shape)}, expected {tuple(shape)} from config.json")
    return tensor


def from_hf(path: str | os.PathLike, vocab: VocabConfig | None = None,
            mesh: jax.sharding.Mesh | None = None, grow_vocab: VocabConfig | None = None,
            seed: int = 0, **model_overrides) -> tuple[ModelConfig, Transformer]:
  """Reads a Hugging Face Qwen2/Dream directory into (config, model); sharded if `mesh`.

  `vocab` names the checkpoint's token layout when config.json does not; with `grow_vocab` the
  model comes out in that bigger layout (omnijax.weights.vocab_growth, new rows drawn with `seed`).
  Audio tensors, when present, fill the speech encoder and projector; `speech_encoder=` (a
  SpeechEncoderConfig, among `model_overrides`) gives their sizes when config.json does not
  and they are not the release's.
  """
  directory = pathlib.Path(path)
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{directory}: no config.json")
  try:
    hf_config = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{config_file}: not valid JSON: {e}") from None
  if not isinstance(hf_config, dict):
    raise CheckpointError(f"{config_file}: expected a JSON object")
  config = config_from_hf(hf_config, vocab, str(config_file), **model_overrides)
  config = dataclasses.replace(config, speech_encoder=_speech_encoder(
      directory, hf_config, config.speech_encoder, config_file))
  growth = None
  if grow_vocab is not None:
    try:
      growth = VocabGrowth.plan(config, grow_vocab, seed)
    except VocabGrowthError as e:
      raise CheckpointError(f"{directory}: cannot grow the vocabulary: {e}") from None
    config = growth.target
  with contextlib.ExitStack() as stack:
    index = _TensorIndex(directory, stack)

    def read(keys: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
      if keys[0] in RELEASE_PREFIXES:
        return _speech_parameter(index, keys, shape)
      if keys[0] == "layers" and config.scan_layers:
        # Stacked [num_layers, ...] parameter: fill one preallocated array layer by layer.
        stacked = np.empty(shape, np.float32)
        for layer in range(shape[0]):
          name, transpose = hf_name(("layers", str(layer)) + keys[1:])
          stacked[layer] = index.read(name, shape[1:], transpose)
        return stacked
      name, transpose = hf_name(keys)
      return index.read(name, shape, transpose)

    model = model_from_arrays(config, growth.reader(read) if growth else read, mesh)
    unused = set(index.location) - index.used
    unexpected = sorted(name for name in unused if not name.endswith(IGNORED_TENSOR_SUFFIXES)
                        and not name.startswith(IGNORED_TENSOR_PREFIXES))
    if unexpected:
      raise CheckpointError(f"tensor {unexpected[0]} in {index.location[unexpected[0]].name} is "
                            f"not a parameter of this architecture ({len(unexpected)} unexpected)")
  return config, model


def _speech_encoder(directory: pathlib.Path, hf_config: dict,
                    requested: SpeechEncoderConfig | None,
                    config_file: pathlib.Path) -> SpeechEncoderConfig | None:
  """The speech encoder to import: none when the checkpoint holds no audio tensors and none is
  requested; else the requested one, config.json's, or the release's. Its am.mvn is checked
  here, before any weight is read."""
  with contextlib.ExitStack() as stack:
    names = _TensorIndex(directory, stack).location
  if requested is None:
    if not any(name.startswith(tuple(RELEASE_PREFIXES.values())) for name in names):
      return None
    requested = SpeechEncoderConfig()
    if SPEECH_CONFIG_KEY in hf_config:
      try:
        requested = from_dict(SpeechEncoderConfig, hf_config[SPEECH_CONFIG_KEY], SPEECH_CONFIG_KEY)
      except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
  speech_statistics(directory, requested)
  return requested


def _speech_parameter(index: _TensorIndex, keys: tuple[str, ...], shape: tuple) -> np.ndarray:
  try:
    return release_parameter(keys, shape, index.tensor)
  except TensorShapeError as e:
    raise CheckpointError(
        f"tensor {e.tensor} in {index.location[e.tensor].name} has shape {e.shape}, expected "
        f"{e.expected} for {e.parameter} (the speech encoder's sizes: config.json's "
        f"{SPEECH_CONFIG_KEY}, else the release's SenseVoiceSmall)") from None


def speech_statistics(directory: str | os.PathLike,
                      speech_encoder: SpeechEncoderConfig | None) -> pathlib.Path | None:
  """The CMVN statistics file (am.mvn) in `directory`, checked to fit the encoder's features;
  None for a model without a speech encoder."""
  if speech_encoder is None:
    return None
  path = pathlib.Path(directory) / CMVN_FILE
  if not path.is_file():
    raise CheckpointError(f"{path}: missing; the speech encoder's CMVN statistics (FunASR's "
                          f"{CMVN_FILE}) belong beside its weights")
  try:
    read_cmvn(path, speech_encoder.feature_size)
  except FrontendError as e:
    raise CheckpointError(str(e)) from None
  return path


def _copy_into(path: pathlib.Path | None, directory: str | os.PathLike) -> None:
  if path is not None:
    atomic_write(pathlib.Path(directory) / path.name, lambda tmp: shutil.copyfile(path, tmp))


# --- writing ----------------------------------------------------------------------------------


def _hf_tensors(model: Transformer, config: ModelConfig, dtype):
  """Yields (HF name, host array) one tensor at a time."""
  state = nnx.state(model, nnx.Param)
  for path, variable in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    keys = tuple(path_str(path).split("/"))
    if keys[0] in RELEASE_PREFIXES:
      continue  # the speech encoder and projector: by their release names, below
    value = variable.get_value()
    layers = ([(("layers", str(i)) + keys[1:], value[i]) for i in range(value.shape[0])]
              if keys[0] == "layers" and config.scan_layers else [(keys, value)])
    for layer_keys, array in layers:
      name, transpose = hf_name(layer_keys)
      host = np.asarray(jax.device_get(array)).astype(dtype)
      yield name, np.ascontiguousarray(host.T if transpose else host)
  for name, array in release_tensors(model).items():
    yield name, np.ascontiguousarray(array.astype(dtype))


def to_hf(model: Transformer, config: ModelConfig, path: str | os.PathLike,
          dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> list[pathlib.Path]:
  """Writes config.json + safetensors shards (+ index); files appear atomically by rename."""
  if not config.qkv_bias or config.qk_norm:
    raise CheckpointError("export needs the release's attention (model.qkv_bias=true, "
                          "model.qk_norm=false): Qwen2 has q/k/v biases and no query/key norms")
  np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16,
              "float16": np.float16}.get(dtype)
  if np_dtype is None:
    raise CheckpointError(f"export dtype {dtype!r}: expected float32, bfloat16 or float16")
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  stale = sorted(p.name for p in directory.iterdir()
                 if p.name == "config.json" or p.name.startswith("model"))
  if stale:
    # Mixing shards or an index from an earlier export would silently corrupt the checkpoint.
    raise CheckpointError(f"{directory} already holds a checkpoint ({', '.join(stale)}); "
                          "export into an empty directory")
  shards: list[dict[str, np.ndarray]] = [{}]
  shard_bytes = 0
  written: list[pathlib.Path] = []
  weight_map: dict[str, str] = {}

  def flush():
    nonlocal shard_bytes
    if not shards[-1]:
      return
    index = len(written) + 1
    name = f"model-{index:05d}.safetensors"
    atomic_write(directory / name, lambda tmp: save_file(shards[-1], tmp, metadata={"format": "pt"}))
    weight_map.update({tensor: name for tensor in shards[-1]})
    written.append(directory / name)
    shards[-1] = {}
    shard_bytes = 0

  for name, array in _hf_tensors(model, config, np_dtype):
    if shard_bytes and shard_bytes + array.nbytes > max_shard_bytes:
      flush()
    shards[-1][name] = array
    shard_bytes += array.nbytes
  flush()

  if len(written) == 1:
    final = directory / "model.safetensors"
    os.replace(written[0], final)
    written = [final]
  else:
    total = sum(p.stat().st_size for p in written)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(directory / "model.safetensors.index.json", json.dumps(index, indent=2))
  atomic_write_text(directory / "config.json", json.dumps(config_to_hf(config, dtype), indent=2))
  return written


# --- command line -----------------------------------------------------------------------------


def parse_vocab(spec: str | None, flag: str = "--vocab") -> VocabConfig | None:
  """`omni_diffusion` or `compact:TEXT,IMAGE_CODES,SPEECH_CODES` -> VocabConfig."""
  if spec is None:
    return None
  if spec == "omni_diffusion":
    return VocabConfig(layout="omni_diffusion")
  layout, _, sizes = spec.partition(":")
  try:
    text, image, speech = (int(x) for x in sizes.split(","))
  except ValueError:
    raise ConfigError(f"{flag} {quoted(spec)}: expected omni_diffusion or "
                      "compact:TEXT,IMAGE_CODES,SPEECH_CODES") from None
  if layout != "compact":
    raise ConfigError(f"{flag} {quoted(spec)}: unknown layout {quoted(layout)}")
  return VocabConfig(layout="compact", text_size=text, n_image_codes=image, n_speech_codes=speech)


def check_model_destination(path: str | os.PathLike, force: bool) -> None:
  """An existing non-empty `path` is refused, or with `force` replaced if it is an omnijax model
  directory (anything else there might be the user's and is never replaced)."""
  from omnijax.model.params_io import CONFIG_FILE

  directory = pathlib.Path(path)
  if not directory.exists():
    return
  if not directory.is_dir():
    raise CheckpointError(f"{directory} exists and is not a directory")
  if not any(directory.iterdir()):
    return
  if not (directory / CONFIG_FILE).is_file():
    raise CheckpointError(f"{directory} is not empty and not an omnijax model directory; "
                          "choose a new or empty directory")
  if not force:
    raise CheckpointError(f"{directory} already holds a model; pass --force to replace it")


def run_convert(args) -> int:
  """`omnijax convert from-hf HF_DIR OUT_DIR` / `omnijax convert to-hf MODEL_DIR HF_DIR`."""
  from omnijax.model.params_io import load_model, save_model

  try:
    # Held throughout: a second convert into the same destination is refused, never mixed in.
    with output_lock(args.dest, "convert"):
      if args.direction == "from-hf":
        check_model_destination(args.dest, args.force)
        config, model = from_hf(args.source, vocab=parse_vocab(args.vocab),
                                grow_vocab=parse_vocab(args.grow_vocab, "--grow-vocab"),
                                seed=args.seed)
        # Written beside the destination and swapped in whole: a failure leaves it as it was.
        staged = staging_dir(args.dest)
        try:
          save_model(model, config, staged)
          _copy_into(speech_statistics(args.source, config.speech_encoder), staged)
          replace_dir(staged, args.dest)
        finally:
          shutil.rmtree(staged, ignore_errors=True)
      else:
        config, model = load_model(args.source)
        statistics = speech_statistics(args.source, config.speech_encoder)  # before any writing
        to_hf(model, config, args.dest, dtype=args.dtype)
        _copy_into(statistics, args.dest)
  except (CheckpointError, FileNotFoundError) as e:
    print(f"omnijax convert: {e}", file=sys.stderr)
    return 1
  print(f"converted {args.source} -> {args.dest}: {config.param_count():,} parameters")
  if config.speech_encoder is None and args.direction == "from-hf":
    print(f"{args.source} holds no speech encoder ({RELEASE_ENCODER_PREFIX}*): imported for "
          "text, images and discrete speech codes only")
  return 0
