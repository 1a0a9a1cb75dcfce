"""Configs as data: YAML files under tpu_configs/ validated into frozen dataclasses.

A YAML file may start with `defaults: [other.yaml, ...]` (paths relative to that file, or to
tpu_configs/); they are merged first, in order, and the file's own keys win. Command-line
overrides `section.key=value` come last; values are parsed as YAML scalars. Every mistake raises
`ConfigError` naming the dotted key (and the file) before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import types
import typing
from typing import Any

import yaml

from omnijax.messages import clip, quoted

from omnijax.vocab import Vocab

CONFIG_ROOT = pathlib.Path(__file__).resolve().parent.parent / "tpu_configs"
DTYPES = ("float32", "bfloat16", "float16")
# Remat policies by name; the model maps them onto jax.checkpoint_policies.
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_except_mlp", "save_attention_out")
# Every value the model config key `attention` accepts (omnijax.kernels.attention dispatches):
#   xla: plain jnp ops, any platform;
#   pallas: omnijax's Pallas flash attention (TPU Mosaic / GPU Triton; interpreted on CPU);
#   splash: JAX's TPU splash attention (interpreted on CPU);
#   cudnn: cuDNN fused attention, GPU only;
#   mosaic_gpu: omnijax's Hopper flash attention in Pallas' Mosaic GPU lowering (H100/H200,
#     16-bit inputs); opt-in only, `auto` never picks it;
#   auto: the fastest correct one for the platform and row kind (omnijax.kernels.attention).
ATTENTION_BACKENDS: tuple[str, ...] = ("xla", "pallas", "splash", "cudnn", "mosaic_gpu", "auto")
# The tasks omnijax trains on. The order defines task indices in shard headers and the
# `task_ids` batch field, so append new tasks at the end.
TASKS: tuple[str, ...] = ("t2i", "caption", "vqa", "asr", "tts", "s2i", "svqa")
# The sampler's confidence rules (reference §4.4), here so the CLI can list them without jax.
SAMPLER_ALGS: tuple[str, ...] = ("maskgit_plus", "topk_margin", "entropy")
# The sampler's KV cache modes (omnijax.diffusion.sampler): none, the prompt's (prefix), or every
# column outside the block being decoded (dual).
SAMPLER_CACHES: tuple[str, ...] = ("none", "prefix", "dual")
# Training objectives (omnijax.diffusion.objective.OBJECTIVES holds one object per name).
OBJECTIVE_KINDS = ("omni", "llada", "ar")
# How a model decodes (omnijax.generate.run.DECODERS holds one function per name): by masked
# diffusion, or one token per forward pass (a model trained with the `ar` objective).
DECODERS: tuple[str, ...] = ("diffusion", "ar")


class ConfigError(ValueError):
  """A config value is missing, unknown or inconsistent; the message names the key."""


def check_task(task: str, key: str) -> None:
  """A config key naming a task must name one of `TASKS`."""
  if task not in TASKS:
    raise ConfigError(f"{key}: unknown task; known tasks: {', '.join(TASKS)}")


def check_seed(seed: int, label: str) -> None:
  """Refuses a seed `jax.random.key` cannot take (it takes an int64); `label` names where it came
  from (`train.seed=N`, `--seed N`)."""
  if not -2**63 <= seed < 2**63:
    raise ConfigError(f"{label}: expected an integer within [-2**63, 2**63)")


# --- reading YAML -------------------------------------------------------------------------------

# YAML aliases stand for whole subtrees: a document whose aliases expand past this many nodes
# (a "billion laughs" bomb) is refused before anything walks it. Real configs hold a few hundred.
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
  """yaml.safe_load's loader (no Python tags) that refuses exponential alias expansion."""

  def compose_document(self):
    node = super().compose_document()
    _check_expansion(node)
    return node


def _check_expansion(root: yaml.Node) -> None:
  """Counts the nodes `root` expands to, each alias counting its whole subtree, and raises a
  ComposerError at the node where the count passes MAX_YAML_NODES (a node that contains itself
  expands forever)."""
  sizes: dict[int, int] = {}
  open_nodes: set[int] = set()

  def size(node: yaml.Node) -> int:
    if id(node) in sizes:
      return sizes[id(node)]
    if id(node) in open_nodes:
      raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it "
                                        "(it expands forever)", node.start_mark)
    open_nodes.add(id(node))
    children = (node.value if isinstance(node, yaml.SequenceNode) else
                [child for pair in node.value for child in pair]
                if isinstance(node, yaml.MappingNode) else [])
    total = 1
    for child in children:
      total += size(child)
      if total > MAX_YAML_NODES:
        raise yaml.composer.ComposerError(
            None, None, f"aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?); "
            "write the values out", child.start_mark)
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total

  size(root)


def _yaml_problem(error: yaml.YAMLError) -> str:
  """A YAML error in one line: what is wrong (a Python tag names itself here) and where."""
  if not isinstance(error, yaml.MarkedYAMLError):
    return clip(" ".join(str(error).split()))
  mark = error.problem_mark or error.context_mark
  where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
  what = "; ".join(part for part in (error.context, error.problem) if part)
  return clip(" ".join(what.split())) + where


def load_yaml(text: str, where: str) -> Any:
  """yaml.safe_load of `text` (Python tags refused) with aliases bounded; every problem is a
  ConfigError of one line, `where: not valid YAML: why`."""
  try:
    return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: Python tags are refused
  except yaml.YAMLError as e:
    raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
  except RecursionError:
    raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None


# --- sections ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VocabConfig:
  """`layout: omni_diffusion` reproduces the release ids; `compact` derives a small layout;
  `text` is text and specials only (codes must be 0): an imported text checkpoint."""

  layout: str = "compact"
  text_size: int = 1024
  n_image_codes: int = 256
  n_speech_codes: int = 256

  def __post_init__(self):
    if self.layout not in ("omni_diffusion", "compact", "text"):
      raise ConfigError(f"model.vocab.layout={self.layout!r}: expected 'omni_diffusion', "
                        "'compact' or 'text'")
    if self.layout == "text" and (self.n_image_codes or self.n_speech_codes):
      raise ConfigError("model.vocab: layout 'text' has no codes; set n_image_codes and "
                        "n_speech_codes to 0")
    try:
      self.build()
    except ValueError as e:  # e.g. a non-positive size: name the config key, not Vocab's field
      raise ConfigError(f"model.vocab: {e}") from None

  def build(self) -> Vocab:
    if self.layout == "omni_diffusion":
      return Vocab.omni_diffusion()
    if self.layout == "text":
      return Vocab.text_only(self.text_size)
    return Vocab.compact(self.text_size, n_image_codes=self.n_image_codes,
                         n_speech_codes=self.n_speech_codes)


# How speech input reaches the model: codes in the vocabulary, or the speech encoder's frames.
SPEECH_INPUT_KINDS: tuple[str, ...] = ("discrete", "continuous")
# Kaldi's window functions (kaldi-native-fbank accepts these names).
FBANK_WINDOWS: tuple[str, ...] = ("hamming", "hanning", "povey", "rectangular", "blackman")
# The encoder prepends this many query embeddings (language, event, emotion, text norm).
SPEECH_QUERIES = 4


@dataclasses.dataclass(frozen=True)
class SpeechEncoderConfig:
  """The continuous speech input (reference §1.4): SenseVoiceSmall's front end (host side:
  kaldi fbank, low frame rate stacking, CMVN) and its SANM encoder. The defaults are exactly the
  release's (SenseVoiceSmall config.yaml as Omni-Diffusion loads it); `tpu_configs/model/speech/`
  holds this preset and a tiny one."""

  # front end: 16 kHz waveform -> num_mel_bins log-mel fbank every frame_shift_ms
  sample_rate: int = 16000
  num_mel_bins: int = 80
  frame_length_ms: float = 25.0
  frame_shift_ms: float = 10.0
  window: str = "hamming"
  # low frame rate: each encoder frame stacks lfr_m fbank frames, one every lfr_n
  lfr_m: int = 7
  lfr_n: int = 6
  # encoder: an input block (feature_size -> hidden_size), num_blocks - 1 more, a LayerNorm, then
  # tp_blocks more and a second LayerNorm; every block is pre-norm attention + FSMN memory + FFN
  hidden_size: int = 512
  num_heads: int = 4
  mlp_size: int = 2048
  num_blocks: int = 50
  tp_blocks: int = 20
  fsmn_kernel_size: int = 11
  layer_norm_eps: float = 1e-5
  # rows of SenseVoice's query table and the four rows the release prepends to every utterance
  num_query_embeddings: int = 16
  language_query: int = 0  # "auto"
  event_query: int = 1
  emotion_query: int = 2
  text_norm_query: int = 15  # "woitn": without inverse text normalisation
  init_std: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  attention: str = "xla"

  def __post_init__(self):
    where = "model.speech_encoder"
    for key in ("sample_rate", "num_mel_bins", "lfr_m", "lfr_n", "hidden_size", "num_heads",
                "mlp_size", "tp_blocks", "fsmn_kernel_size", "num_query_embeddings"):
      if getattr(self, key) < 1:
        raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
    if self.num_blocks < 2:
      raise ConfigError(f"{where}.num_blocks={self.num_blocks} must be >= 2 (the input block "
                        "and at least one more)")
    if self.frame_length_ms <= 0 or self.frame_shift_ms <= 0 or self.layer_norm_eps <= 0:
      raise ConfigError(f"{where}.frame_length_ms, frame_shift_ms and layer_norm_eps must be > 0")
    if self.window not in FBANK_WINDOWS:
      raise ConfigError(f"{where}.window={self.window!r}: expected one of {FBANK_WINDOWS}")
    if self.feature_size % 2:
      raise ConfigError(f"{where}: num_mel_bins x lfr_m = {self.feature_size} must be even (the "
                        "sinusoidal encoding is sin and cos halves of the input width)")
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"{where}.hidden_size={self.hidden_size} is not divisible by "
                        f"{where}.num_heads={self.num_heads}")
    for key in ("language_query", "event_query", "emotion_query", "text_norm_query"):
      if not 0 <= getattr(self, key) < self.num_query_embeddings:
        raise ConfigError(f"{where}.{key}={getattr(self, key)} is not a row of the "
                          f"{self.num_query_embeddings}-row query table")
    for key in ("param_dtype", "compute_dtype"):
      if getattr(self, key) not in DTYPES:
        raise ConfigError(f"{where}.{key}={getattr(self, key)!r}: expected one of {DTYPES}")
    if self.attention not in ATTENTION_BACKENDS:
      raise ConfigError(f"{where}.attention={self.attention!r}: expected one of "
                        f"{ATTENTION_BACKENDS}")

  @property
  def feature_size(self) -> int:
    """Width of one encoder input frame (560 in the release)."""
    return self.num_mel_bins * self.lfr_m

  @property
  def query_ids(self) -> tuple[int, int, int, int]:
    """The query rows in the order the encoder prepends them."""
    return (self.language_query, self.event_query, self.emotion_query, self.text_norm_query)

  def param_count(self) -> int:
    """Exact parameter count of the encoder built from this config (no CTC head)."""
    d, f = self.hidden_size, self.mlp_size

    def block(in_size: int) -> int:
      attention = 3 * (in_size * d + d) + d * d + d + self.fsmn_kernel_size * d
      return 2 * in_size + attention + 2 * d + (d * f + f + f * d + d)

    blocks = block(self.feature_size) + (self.num_blocks - 1 + self.tp_blocks) * block(d)
    return self.num_query_embeddings * self.feature_size + blocks + 2 * 2 * d


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen2/Dream backbone dimensions and how it is computed."""

  name: str = "custom"
  vocab: VocabConfig = VocabConfig()
  # Embedding rows are padded up to a multiple of this (shardable lm_head); 1 keeps release shapes.
  vocab_pad_multiple: int = 1
  # Explicit embedding rows (e.g. an imported checkpoint's); overrides vocab_pad_multiple.
  embedding_rows: int | None = None
  num_layers: int = 2
  hidden_size: int = 64
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None  # default hidden_size // num_heads
  mlp_size: int = 128
  rope_theta: float = 1_000_000.0
  rms_eps: float = 1e-6
  qkv_bias: bool = True
  # Opt-in stabiliser, not the release's architecture (Qwen2 has none): RMSNorm over head_dim on
  # each query and key head before RoPE (as Qwen3), which bounds attention logits so a higher
  # learning rate does not collapse attention onto single tokens.
  qk_norm: bool = False
  tie_embeddings: bool = False
  init_std: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  attention: str = "xla"
  # The continuous speech input's encoder (the projector maps it to hidden_size); None: speech
  # enters as discrete codes only.
  speech_encoder: SpeechEncoderConfig | None = None

  def __post_init__(self):
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "mlp_size",
                "vocab_pad_multiple"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"model.num_heads={self.num_heads} is not divisible by "
                        f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                        f"model.num_heads={self.num_heads}; set model.head_dim explicitly")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"model.head_dim={self.resolved_head_dim} must be even for RoPE")
    for key in ("param_dtype", "compute_dtype"):
      if getattr(self, key) not in DTYPES:
        raise ConfigError(f"model.{key}={getattr(self, key)!r}: expected one of {DTYPES}")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"model.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_BACKENDS:
      raise ConfigError(f"model.attention={self.attention!r}: expected one of {ATTENTION_BACKENDS}")
    if self.embedding_rows is not None and self.embedding_rows < self.vocab.build().size:
      raise ConfigError(f"model.embedding_rows={self.embedding_rows} is smaller than the "
                        f"vocabulary layout's {self.vocab.build().size} ids")
    if self.rope_theta <= 0 or self.rms_eps <= 0:
      raise ConfigError("model.rope_theta and model.rms_eps must be positive")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def vocab_size(self) -> int:
    """Embedding / lm_head rows: the layout's ids, padded."""
    if self.embedding_rows is not None:
      return self.embedding_rows
    size = self.vocab.build().size
    return -(-size // self.vocab_pad_multiple) * self.vocab_pad_multiple

  def param_count(self) -> int:
    """Exact parameter count of the model built from this config: the backbone, and the speech
    encoder and projector when configured."""
    d, hd, v = self.hidden_size, self.resolved_head_dim, self.vocab_size
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    attention = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
    mlp = 3 * d * self.mlp_size
    layer = attention + mlp + 2 * d + (2 * hd if self.qk_norm else 0)
    heads = v * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * layer + heads + d + self.speech_param_count()

  def speech_param_count(self) -> int:
    """Parameters of the speech encoder plus its projector (LayerNorm and two bias-free
    linears onto hidden_size); 0 without an encoder."""
    if self.speech_encoder is None:
      return 0
    width, d = self.speech_encoder.hidden_size, self.hidden_size
    return self.speech_encoder.param_count() + 2 * width + width * d + d * d


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axes. `data`, `fsdp`, `tensor` split the devices of one slice (ICI); the
  `dcn_` sizes split the slices of a multi-slice job (data-center network), whose product is
  the number of slices. Each level may have one -1, which takes what the others leave."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  # Across slices only data parallelism by default: its one all-reduce per step is what the
  # slow DCN links carry best (FSDP or tensor traffic across slices rarely pays).
  dcn_data: int = -1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1

  def __post_init__(self):
    for prefix, sizes in (("", self.as_dict()), ("dcn_", self.dcn_dict())):
      if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"mesh: at most one {prefix and 'dcn_ '}axis may be -1, got "
                          f"{ {prefix + k: v for k, v in sizes.items()} }")
      for axis, size in sizes.items():
        if size == 0 or size < -1:
          raise ConfigError(f"mesh.{prefix}{axis}={size}: expected a positive size or -1")

  def as_dict(self) -> dict[str, int]:
    """Within a slice."""
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

  def dcn_dict(self) -> dict[str, int]:
    """Across slices."""
    return {"data": self.dcn_data, "fsdp": self.dcn_fsdp, "tensor": self.dcn_tensor}


@dataclasses.dataclass(frozen=True)
class TopologyConfig:
  """A TPU topology to compile for ahead of time (`omnijax compile`); empty = local devices.

  Fields are libtpu's: e.g. name "v5e:2x4"; v5p pods as name "v5:4x4x4" with
  chip_config_name "megacore", chips_per_host_bounds [2, 2, 1] and wrap [true, true, true].
  """

  name: str = ""
  chip_config_name: str = ""
  chips_per_host_bounds: tuple[int, ...] = ()
  wrap: tuple[bool, ...] = ()
  num_slices: int = 1

  def __post_init__(self):
    if self.num_slices < 1:
      raise ConfigError(f"topology.num_slices={self.num_slices} must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where pre-tokenized shards live and how the Grain pipeline turns them into batches."""

  dir: str = "data/toyworld"
  # Subdirectory of `dir` holding the shards and manifest.json (`omnijax prepare` writes splits).
  split: str = "train"
  seq_len: int = 512
  global_batch_size: int = 8
  # Task name -> sampling weight; empty means every task present in the shards, weight 1.
  mixture: dict[str, float] = dataclasses.field(default_factory=dict)
  tail_pads_min: int = 1
  tail_pads_max: int = 16
  # Per-task exceptions to tail_pads_max ({task: most pads}). A task decoded on a canvas with
  # more room after its response than tail_pads_max (toy TTS: up to 33 positions, since the
  # canvas must hold the slowest speech) otherwise decodes positions training never showed as
  # pads, and fills them with more speech.
  task_tail_pads_max: dict[str, int] = dataclasses.field(default_factory=dict)
  seed: int = 0
  # Grain worker processes (0 = in the training process) and local batches each keeps ready.
  num_workers: int = 0
  worker_buffer_size: int = 2
  # Continuous speech input (model.speech_encoder set): every row's speech_features hold up to
  # `speech_clips` clips of `speech_frames` encoder input frames, one fixed shape [rows, clips,
  # frames, feature_size]; 500 frames are 30 s at 16 kHz through the release's front end.
  speech_clips: int = 1
  speech_frames: int = 500

  def __post_init__(self):
    if self.speech_clips < 1 or self.speech_frames < 1:
      raise ConfigError(f"data.speech_clips={self.speech_clips} and data.speech_frames="
                        f"{self.speech_frames} must be >= 1")
    if self.seq_len < 2 or self.global_batch_size < 1:
      raise ConfigError("data.seq_len must be >= 2 and data.global_batch_size >= 1")
    if not 0 <= self.tail_pads_min <= self.tail_pads_max:
      raise ConfigError(f"data.tail_pads_min={self.tail_pads_min} must be in "
                        f"[0, data.tail_pads_max={self.tail_pads_max}]")
    for task, most in self.task_tail_pads_max.items():
      check_task(task, f"data.task_tail_pads_max.{task}")
      if not (isinstance(most, int) and self.tail_pads_min <= most):
        raise ConfigError(f"data.task_tail_pads_max.{task}={most!r} must be an integer >= "
                          f"data.tail_pads_min={self.tail_pads_min}")
    for task, weight in self.mixture.items():
      check_task(task, f"data.mixture.{task}")
      if weight < 0:
        raise ConfigError(f"data.mixture.{task}={weight} must be >= 0")
    if self.num_workers < 0 or self.worker_buffer_size < 1:
      raise ConfigError("data.num_workers must be >= 0 and data.worker_buffer_size >= 1")
    if not self.split or "/" in self.split:
      raise ConfigError(f"data.split={self.split!r} must name one subdirectory of data.dir")
    # Grain shuffles each task's records with the 32-bit seed `seed * len(TASKS) + task`.
    if not 0 <= self.seed < 2**32 // len(TASKS):
      raise ConfigError(f"data.seed={self.seed}: expected an integer in [0, "
                        f"{2**32 // len(TASKS)}) (the pipeline's 32-bit shuffle seeds derive from it)")


@dataclasses.dataclass(frozen=True)
class ToyWorldConfig:
  """How `omnijax train` generates the toy world when `data.dir` holds no shards yet."""

  # The only directory train generates it into, and only while data.dir names it (a data.dir
  # given on the command line elsewhere must hold a dataset); empty: never generate.
  dir: str = ""
  scenes: int = 0  # 0: never generate (missing shards are an error)
  seed: int = 0
  grid: int = 16
  cells: int = 2
  # How the speech-in tasks' (asr, s2i, svqa) user turns hear speech: discrete codes, or
  # continuous (synthetic waveforms through the model's speech encoder; needs
  # model.speech_encoder). tts answers in discrete codes either way.
  speech_input: str = "discrete"

  def __post_init__(self):
    if self.speech_input not in SPEECH_INPUT_KINDS:
      raise ConfigError(f"toyworld.speech_input={self.speech_input!r}: expected one of "
                        f"{SPEECH_INPUT_KINDS}")
    if self.seed < 0:  # numpy's seed sequences take non-negative integers
      raise ConfigError(f"toyworld.seed={self.seed}: expected an integer >= 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `omnijax train` evaluates after its last stage (the main job's eval.json and plots):
  `samples` held-out samples of each task, decoded at each of `steps` and at the task's
  default setting."""

  after_training: bool = False
  # heldout: the figures reported; the toy world's `validation` split is for recipe choices.
  split: str = "heldout"
  samples: int = 16
  steps: tuple[int, ...] = (4, 10, 64)
  batch_size: int = 16

  def __post_init__(self):
    if self.samples < 1 or self.batch_size < 1:
      raise ConfigError(f"eval.samples={self.samples} and eval.batch_size={self.batch_size} "
                        "must be >= 1")
    if not self.steps or min(self.steps) < 1:
      raise ConfigError(f"eval.steps={list(self.steps)}: expected positive step counts")


LOSS_AVERAGES = ("tokens", "samples")
MASK_SCHEDULES = ("uniform", "cosine")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """`omni`: the release's per-token masking; `llada`: one t per sample, CE weighted by 1/t;
  `ar`: the autoregressive baseline, next-token loss with causal attention (eps and
  pad_mask_ratio do not apply)."""

  kind: str = "omni"
  eps: float = 1e-3
  # Tail pads are masked at this fraction of a token's threshold (attenuated tail-pad masking).
  pad_mask_ratio: float = 0.6
  # The loss applies the lm_head in this many vocabulary chunks (forward and backward): the full
  # [tokens, vocab] logits are never materialised. More saves memory, fewer runs fewer (bigger)
  # lm_head matmuls; 1 is the whole vocabulary at once.
  vocab_chunks: int = 8
  # What the loss averages over: `tokens` (every target token counts the same, as the release),
  # or `samples` (each packed sample's loss is the mean over its own response, then samples are
  # averaged: LLaDA's SFT estimator), so a 2-token answer weighs as much as a 66-code image.
  average: str = "tokens"
  # How the masking level t is drawn: `uniform` (t ~ U(0, 1), the release and LLaDA) or
  # `cosine` (t = cos(pi/2 r), r ~ U(0, 1), MaskGIT's schedule): nearly fully masked canvases,
  # where the answer can come only from the prompt, are drawn 2.9x as often (P(t > 0.9) = 0.29
  # against 0.10), fewer of the nearly whole ones that a response's own tokens fill in.
  mask_schedule: str = "uniform"
  # Per-task exceptions to `mask_schedule` ({task: schedule}). A response whose tokens repeat
  # each other (an image's codes, speech's held frames) is learned from its prompt only where
  # nearly all of it is masked, since any visible token gives its neighbours away; uniform
  # draws mask all 16 codes of a toy-world image cell with probability 1/17, cosine's 0.20.
  task_mask_schedules: dict[str, str] = dataclasses.field(default_factory=dict)
  # Per-task factors on the loss ({task: weight}, 1 for the tasks not named): every target of
  # the task has its weight multiplied, the denominator unchanged. Unlike a mixture weight it
  # takes no batch slots from the other tasks: with `average: samples` a 2-token VQA answer
  # followed by 1-16 tail pads is about a tenth of its sample's weight, a caption's words two
  # thirds of theirs.
  task_loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.mask_schedule not in MASK_SCHEDULES:
      raise ConfigError(f"train.objective.mask_schedule={self.mask_schedule!r}: expected one of "
                        f"{', '.join(MASK_SCHEDULES)}")
    for task, schedule in self.task_mask_schedules.items():
      check_task(task, f"train.objective.task_mask_schedules.{task}")
      if schedule not in MASK_SCHEDULES:
        raise ConfigError(f"train.objective.task_mask_schedules.{task}={schedule!r}: expected "
                          f"one of {', '.join(MASK_SCHEDULES)}")
    for task, weight in self.task_loss_weights.items():
      check_task(task, f"train.objective.task_loss_weights.{task}")
      if not weight >= 0:
        raise ConfigError(f"train.objective.task_loss_weights.{task}={weight} must be >= 0")
    if self.average not in LOSS_AVERAGES:
      raise ConfigError(f"train.objective.average={self.average!r}: expected one of "
                        f"{', '.join(LOSS_AVERAGES)}")
    if self.kind not in OBJECTIVE_KINDS:
      raise ConfigError(f"train.objective.kind={self.kind!r}: expected one of "
                        f"{', '.join(OBJECTIVE_KINDS)}")
    if self.vocab_chunks < 1:
      raise ConfigError(f"train.objective.vocab_chunks={self.vocab_chunks} must be >= 1")
    if not 0 < self.eps < 1 or not 0 < self.pad_mask_ratio <= 1:
      raise ConfigError("train.objective.eps must lie in (0, 1) and pad_mask_ratio in (0, 1]")


OPTIMIZER_KINDS = ("adamw", "muon")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with global-norm clipping (release: beta2 0.95, no weight decay, clip 1.0), or Muon
  (`kind: muon`, optax.contrib): the projections' kernels step along their orthogonalised
  momentum, scaled to AdamW's update size so that the same learning rates apply; embeddings,
  lm_head, norms and biases stay on AdamW with these settings."""

  kind: str = "adamw"
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float = 1.0

  def __post_init__(self):
    if self.kind not in OPTIMIZER_KINDS:
      raise ConfigError(f"train.optimizer.kind={self.kind!r}: expected one of "
                        f"{', '.join(OPTIMIZER_KINDS)}")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ConfigError(f"train.optimizer.b1={self.b1} and b2={self.b2} must lie in [0, 1)")
    if self.eps <= 0 or self.weight_decay < 0 or self.clip_norm <= 0:
      raise ConfigError("train.optimizer.eps and clip_norm must be > 0, weight_decay >= 0")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage: its length, learning-rate schedule, data mixture, trainable params."""

  steps: int = 100
  peak_lr: float = 1e-4
  warmup_steps: int = 0
  decay: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
  end_lr_ratio: float = 0.1  # final LR as a fraction of peak_lr
  decay_fraction: float = 0.2  # wsd: the last fraction of the stage decays linearly
  mixture: dict[str, float] = dataclasses.field(default_factory=dict)
  # Regexes over parameter paths (e.g. "layers/mlp/.*"); parameters matching none are frozen.
  trainable: tuple[str, ...] = (".*",)
  # The speech encoder (model.speech_encoder) stays frozen whatever `trainable` says, as in the
  # release; false lets `trainable` decide for it too. Its projector always follows `trainable`.
  freeze_speech_encoder: bool = True
  # Keep the previous stage's optimizer moments (needs the same trainable set), or start fresh.
  carry_optimizer: bool = True

  def __post_init__(self):
    if self.steps < 1 or self.warmup_steps < 0 or self.warmup_steps > self.steps:
      raise ConfigError(f"stage steps={self.steps} must be >= 1 and warmup_steps="
                        f"{self.warmup_steps} within [0, steps]")
    if self.peak_lr <= 0 or not 0 <= self.end_lr_ratio <= 1:
      raise ConfigError("stage peak_lr must be > 0 and end_lr_ratio within [0, 1]")
    if self.decay not in ("cosine", "wsd", "constant"):
      raise ConfigError(f"stage decay={self.decay!r}: expected cosine, wsd or constant")
    if not 0 < self.decay_fraction <= 1:
      raise ConfigError(f"stage decay_fraction={self.decay_fraction} must lie in (0, 1]")
    if not self.trainable:
      raise ConfigError("stage trainable must list at least one parameter pattern")
    for pattern in self.trainable:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f"trainable pattern {pattern!r} is not a valid regex: {e}") from None
    for task, weight in self.mixture.items():
      check_task(task, f"mixture.{task}")
      if weight < 0:
        raise ConfigError(f"mixture.{task}={weight} must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  # An omnijax model directory (`omnijax convert from-hf` output) to start from instead of
  # random weights, e.g. the released checkpoint for fine-tuning.
  init_from: str = ""
  objective: ObjectiveConfig = ObjectiveConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  # Micro-batches per step, accumulated with lax.scan.
  grad_accum_steps: int = 1
  # token_mean: one mean over every masked token of the step (equals the big batch);
  # sum_of_means: the release's sum of micro-batch means (clipping then acts on the sum).
  grad_accum_reduction: str = "token_mean"
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 10
  # Peak FLOP/s of one device for MFU; 0 = known TPU/GPU peak, or the measured matmul rate on CPU.
  peak_flops_per_device: float = 0.0
  # Stage name -> stage, run in the order they are defined (includes merge in order).
  stages: dict[str, StageConfig] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    check_seed(self.seed, f"train.seed={clip(str(self.seed))}")
    if self.grad_accum_steps < 1:
      raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps} must be >= 1")
    if self.grad_accum_reduction not in ("token_mean", "sum_of_means"):
      raise ConfigError(f"train.grad_accum_reduction={self.grad_accum_reduction!r}: expected "
                        "token_mean or sum_of_means")
    if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
      raise ConfigError("train.checkpoint_every, keep_checkpoints and log_every must be >= 1")

  @property
  def ordered_stages(self) -> list[tuple[str, StageConfig]]:
    return list(self.stages.items())

  def resolve_stage(self, stage: str) -> str:
    """`--stage` value -> stage name: a name from train.stages, or its 1-based position."""
    names = list(self.stages)
    if stage in names:
      return stage
    if stage.isdigit() and 1 <= int(stage) <= len(names):
      return names[int(stage) - 1]
    raise ConfigError(f"--stage {stage}: expected one of {names} or a number 1..{len(names)}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  topology: TopologyConfig = TopologyConfig()
  data: DataConfig = DataConfig()
  toyworld: ToyWorldConfig = ToyWorldConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()

  def __post_init__(self):
    if self.data.global_batch_size % self.train.grad_accum_steps:
      raise ConfigError(f"data.global_batch_size={self.data.global_batch_size} is not divisible "
                        f"by train.grad_accum_steps={self.train.grad_accum_steps}")
    if self.model.speech_encoder is None:
      if self.toyworld.speech_input == "continuous":
        raise ConfigError("toyworld.speech_input=continuous needs a speech encoder "
                          "(model.speech_encoder), which this model has not")


# --- loading ----------------------------------------------------------------------------------


def _resolve_include(name: str, including_file: pathlib.Path) -> pathlib.Path:
  for candidate in (including_file.parent / name, CONFIG_ROOT / name):
    if candidate.is_file():
      return candidate
  raise ConfigError(f"{including_file}: defaults entry {name!r} not found next to the file or "
                    f"under {CONFIG_ROOT}")


def _deep_merge(base: dict, update: dict) -> dict:
  merged = dict(base)
  for key, value in update.items():
    if isinstance(value, dict) and isinstance(merged.get(key), dict):
      merged[key] = _deep_merge(merged[key], value)
    else:
      merged[key] = value
  return merged


def load_yaml_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict:
  """Reads a YAML config with its `defaults` includes merged in (no validation)."""
  path = pathlib.Path(path).resolve()
  if path in _seen:
    raise ConfigError(f"{path}: circular defaults include")
  if not path.exists():
    raise ConfigError(f"config file {path} does not exist")
  if not path.is_file():  # a directory, or a device such as /dev/zero that never ends
    raise ConfigError(f"config file {path} is not a regular file")
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"config file {path}: cannot read it ({e})") from None
  tree = load_yaml(text, str(path)) or {}
  if not isinstance(tree, dict):
    raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
  includes = tree.pop("defaults", []) or []
  if isinstance(includes, str):
    includes = [includes]
  merged: dict = {}
  for name in includes:
    merged = _deep_merge(merged, load_yaml_tree(_resolve_include(name, path), _seen + (path,)))
  return _deep_merge(merged, tree)


def apply_overrides(tree: dict, overrides: typing.Iterable[str]) -> dict:
  """Applies `a.b.c=value` strings; the value is parsed as a YAML scalar/list/mapping."""
  tree = dict(tree)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {quoted(item)} is not of the form key=value")
    key, raw = item.split("=", 1)
    value = load_yaml(raw, f"override {quoted(item)}: its value")
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
      child = node.get(part)
      if child is None:
        child = {}
      elif not isinstance(child, dict):
        raise ConfigError(f"override {quoted(item)}: {'.'.join(parts[:depth + 1])} is not a "
                          "section")
      node[part] = dict(child)
      node = node[part]
    node[parts[-1]] = value
  return tree


def _coerce(value: Any, annotation: Any, where: str) -> Any:
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(annotation)
    if value is None and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _coerce(value, option, where)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{where}: invalid value {quoted(value)}")
  if dataclasses.is_dataclass(annotation):
    if isinstance(value, annotation):
      return value
    return from_dict(annotation, value, where)
  if origin in (dict, typing.Dict):
    key_type, value_type = typing.get_args(annotation) or (str, Any)
    if not isinstance(value, dict):
      raise ConfigError(f"{where}: expected a mapping, got {quoted(value)}")
    return {_coerce(k, key_type, f"{where}.{clip(str(k))}"):
            _coerce(v, value_type, f"{where}.{clip(str(k))}")
            for k, v in value.items()}
  if origin in (tuple, list, typing.Tuple, typing.List):
    args = typing.get_args(annotation)
    item_type = args[0] if args else Any
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {quoted(value)}")
    items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin in (tuple, typing.Tuple) else items
  if annotation is Any:
    return value
  if annotation is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{where}: expected true/false, got {quoted(value)}")
    return value
  if annotation is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{where}: expected an integer, got {quoted(value)}")
    return value
  if annotation is float:
    # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number everyone means.
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where}: expected a number, got {quoted(value)}")
    return float(value)
  if annotation is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}: expected a string, got {quoted(value)}")
    return value
  raise ConfigError(f"{where}: unsupported config type {annotation!r}")


def from_dict(cls, tree: Any, where: str = ""):
  """Builds dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
  if tree is None:
    tree = {}
  if not isinstance(tree, dict):
    raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {quoted(tree)}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted((key for key in tree if key not in names), key=str)  # YAML keys: any type
  if unknown:
    prefix = f"{where}." if where else ""
    raise ConfigError(f"unknown config key {prefix}{clip(str(unknown[0]))} (known keys: "
                      f"{sorted(names)})")
  kwargs = {}
  for key, value in tree.items():
    kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
  try:
    return cls(**kwargs)
  except ConfigError as e:
    # Sections that cannot know their own key (e.g. one of several stages) get it prefixed.
    if where and not str(e).startswith(where.split(".")[0]):
      raise ConfigError(f"{where}: {e}") from None
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where or cls.__name__}: {e}") from None


def load_config(path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = (),
                cls=Config):
  """YAML file (+ includes) + `key=value` overrides -> validated config dataclass."""
  tree = load_yaml_tree(path) if path is not None else {}
  tree = apply_overrides(tree, overrides)
  try:
    return from_dict(cls, tree)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def add_config_args(parser) -> None:
  """`--config FILE` and trailing `key=value` overrides, for an argparse (sub)parser."""
  parser.add_argument("--config", required=True, help="YAML config under tpu_configs/")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, e.g. model.num_layers=4 mesh.tensor=2")


def to_dict(config) -> dict:
  """Plain nested dict of a config (for logging and checkpoint metadata)."""
  return dataclasses.asdict(config)
