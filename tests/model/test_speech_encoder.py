"""The SenseVoice encoder and the projector: parity with FunASR / the release's projector on
random weights and features (fp32), padding, shapes, parameter count, logical axes, config."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from omnijax.config import (CONFIG_ROOT, ConfigError, MeshConfig, SpeechEncoderConfig,
                            load_config)
from omnijax.model.build import abstract_module, module_from_arrays
from omnijax.model.speech import SpeechEncoder, SpeechProjector, encoded_frames
from omnijax.model.speech_params import encoder_from_tensors, projector_from_tensors
from omnijax.sharding import RULES, make_mesh, replicated_fraction, state_shardings

PARITY_TOLERANCE = 1e-4  # the bound on the encoder output, fp32
# A padded batch: full, shorter than the FSMN filter's reach from the end, no frames (the
# queries only). The tests share this shape so that they share compilations.
LENGTHS, FRAMES = np.array([23, 9, 2, 0]), 23


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, features, lengths):
  return nnx.merge(graphdef, state)(features, lengths)


def encode(encoder, features, lengths):
  """Jitted once per encoder structure and shape, the parameters passed as arguments (closed-over
  weights would be constant-folded)."""
  return np.asarray(_encode(*nnx.split(encoder), features, lengths))


def padded_features(config, lengths, frames, seed=0):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((len(lengths), frames, config.feature_size)).astype(np.float32)
  for row, length in enumerate(lengths):
    features[row, length:] = 0.0  # as FunASR's pad_sequence leaves them
  return features


def assert_parity(config, sensevoice, lengths, frames, seed=0):
  reference = sensevoice.build(config, seed)
  tensors = sensevoice.state_dict(reference)
  encoder = encoder_from_tensors(config, tensors.__getitem__)
  features = padded_features(config, lengths, frames, seed)
  expected = sensevoice.encode(reference, features, lengths)
  ours = encode(encoder, features, lengths)
  assert ours.shape == expected.shape == (len(lengths), frames + 4, config.hidden_size)
  worst = 0.0
  for row, length in enumerate(lengths):
    valid = encoded_frames(length)  # FunASR's rows past the length are garbage, ours zeros
    worst = max(worst, float(np.abs(ours[row, :valid] - expected[row, :valid]).max()))
    np.testing.assert_array_equal(ours[row, valid:], 0.0)
  assert worst <= PARITY_TOLERANCE, worst
  return worst


@pytest.mark.parametrize("kernel", [5, 4, 11])
def test_tiny_encoder_matches_funasr_on_a_padded_batch(tiny_speech_model, sensevoice, kernel):
  config = dataclasses.replace(tiny_speech_model().speech_encoder, fsmn_kernel_size=kernel)
  assert_parity(config, sensevoice, LENGTHS, FRAMES, seed=kernel)


@pytest.mark.slow
def test_release_encoder_matches_funasr(sensevoice):
  """The release's sizes (221 M parameters), random weights; ~20 s, ~2.7 GB."""
  worst = assert_parity(SpeechEncoderConfig(), sensevoice, lengths=np.array([29, 12]), frames=29)
  print(f"release-size encoder: max abs difference {worst:.2e}")


def test_projector_matches_the_release_resampler_projector(tiny_speech_model, sensevoice):
  config = tiny_speech_model()
  reference = sensevoice.build_projector(config.speech_encoder.hidden_size, config.hidden_size)
  projector = projector_from_tensors(config, sensevoice.state_dict(reference).__getitem__)
  x = np.random.default_rng(0).standard_normal((2, 7, config.speech_encoder.hidden_size))
  x = x.astype(np.float32)
  np.testing.assert_allclose(np.asarray(projector(x)), sensevoice.project(reference, x),
                             atol=1e-5)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_speech_model):
  """Every parameter random at unit scale (filled from host arrays: no compilation)."""
  config = tiny_speech_model().speech_encoder
  rng = np.random.default_rng(3)
  return module_from_arrays(lambda rngs: SpeechEncoder(config, rngs),
                            lambda path, shape: rng.normal(size=shape) / np.sqrt(shape[-1]))


def test_padding_never_reaches_the_valid_frames(tiny_encoder):
  features = padded_features(tiny_encoder.config, LENGTHS, FRAMES)
  noisy = features.copy()
  noisy[1, 9:] = 100.0
  noisy[3] = -100.0
  base = encode(tiny_encoder, features, LENGTHS)
  np.testing.assert_array_equal(encode(tiny_encoder, noisy, LENGTHS), base)
  # ... while a change inside the valid frames reaches every frame (attention) of that row.
  changed = features.copy()
  changed[1, 8] += 1.0
  moved = np.abs(encode(tiny_encoder, changed, LENGTHS) - base).max(axis=-1)
  assert (moved[1, :13] > 0).all() and (moved[1, 13:] == 0).all()
  assert (moved[[0, 2, 3]] == 0).all()


def _funasr_parameter_count(sensevoice, config) -> int:
  return sum(int(np.prod(shape)) for name, shape in sensevoice.shapes(config).items()
             if not name.startswith("ctc."))


def test_release_preset_is_the_released_encoder(sensevoice):
  preset = load_config(CONFIG_ROOT / "model" / "speech" / "sensevoice_small.yaml").model
  config = preset.speech_encoder
  assert config == SpeechEncoderConfig()  # the defaults are the release, and so is the file
  assert config.feature_size == 560 and config.query_ids == (0, 1, 2, 15)
  _, state = abstract_module(lambda rngs: SpeechEncoder(config, rngs))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state))
  assert count == config.param_count() == _funasr_parameter_count(sensevoice, config)
  assert count == 221_145_952  # 221,136,992 in the encoder + the 16 x 560 query table
  assert state["blocks"]["self_attn"]["linear_q"]["kernel"].shape == (49, 512, 512)
  assert state["tp_blocks"]["self_attn"]["fsmn"].shape == (20, 11, 512)
  assert state["input_block"]["self_attn"]["linear_q"]["kernel"].shape == (560, 512)


def test_tiny_parameter_count(tiny_speech_model, sensevoice):
  config = tiny_speech_model().speech_encoder
  assert config.param_count() == _funasr_parameter_count(sensevoice, config)


def _logical_axes(state):
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [(v.get_metadata()["logical_axes"], v.get_value().shape) for v in leaves]


def test_every_parameter_has_a_logical_axis_per_dimension_with_a_rule():
  config = load_config(CONFIG_ROOT / "model" / "omni7b.yaml",
                       ["model.speech_encoder={}"]).model  # the release backbone and encoder
  known = {name for name, _ in RULES}
  for create in (lambda rngs: SpeechEncoder(config.speech_encoder, rngs),
                 lambda rngs: SpeechProjector(config, rngs)):
    _, state = abstract_module(create)
    for axes, shape in _logical_axes(state):
      assert len(axes) == len(shape) and set(axes) <= known, (axes, shape)
  _, projector = abstract_module(lambda rngs: SpeechProjector(config, rngs))
  assert projector["linear_in"]["kernel"].shape == (512, 3584)
  assert projector["linear_out"]["kernel"].shape == (3584, 3584)


def test_release_encoder_shards_like_the_backbone():
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  _, state = abstract_module(lambda rngs: SpeechEncoder(SpeechEncoderConfig(), rngs))
  # Width and the 560-wide input on fsdp, heads and FFN on tensor; what stays whole is norms,
  # biases and the FSMN taps' share.
  assert replicated_fraction(state, mesh) < 0.002
  shardings = state_shardings(state, mesh)
  spec = lambda *path: shardings[path[0]][path[1]][path[2]][path[3]].spec
  assert spec("blocks", "self_attn", "linear_q", "kernel") == P(None, "fsdp", "tensor")
  assert spec("blocks", "feed_forward", "w_2", "kernel") == P(None, "tensor", "fsdp")
  assert spec("input_block", "self_attn", "linear_k", "kernel") == P("fsdp", "tensor")
  assert shardings["tp_blocks"]["self_attn"]["fsmn"].spec == P(None, None, "tensor")
  assert shardings["queries"].spec == P(None, "fsdp")


# The tiny encoder's parameters above this size: its input block's q/k/v (560 x 64), the query
# table (16 x 560), the blocks' stacked kernels; below it only norms, biases and FSMN taps.
LARGE_TINY_PARAMETER = 4096


@pytest.mark.parametrize("fsdp", [8, 32])
def test_tiny_encoder_shards_every_large_parameter(tiny_speech_model, fsdp):
  # Until the 560-wide input dimension had an fsdp rule, a quarter of the tiny encoder's
  # parameters (its input block's q/k/v and the query table) were whole on every chip at fsdp 8.
  # fsdp 32 does not divide 560: the input kernels shard their 64-wide output instead.
  mesh = jax.sharding.AbstractMesh((1, fsdp, 1), ("data", "fsdp", "tensor"))
  _, state = abstract_module(lambda rngs: SpeechEncoder(tiny_speech_model().speech_encoder, rngs))
  shardings = state_shardings(state, mesh)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=is_variable)
  for (path, variable), sharding in zip(leaves, jax.tree.leaves(shardings)):
    shape = variable.get_value().shape
    if np.prod(shape) > LARGE_TINY_PARAMETER and path[0].key != "queries":
      assert "fsdp" in jax.tree.leaves(tuple(sharding.spec)), (path, shape, sharding.spec)
  assert replicated_fraction(state, mesh) < (0.025 if fsdp == 8 else 0.06)
  input_kernel = shardings["input_block"]["self_attn"]["linear_q"]["kernel"].spec
  assert input_kernel == (P("fsdp", None) if fsdp == 8 else P(None, "fsdp"))
  # 16 query rows split over no fsdp axis of 32, nor their 560 columns: whole at fsdp 32 only.
  assert shardings["queries"].spec == (P(None, "fsdp") if fsdp == 8 else P(None, None))


def test_sharded_encoder_computes_what_the_single_device_one_does(tiny_encoder):
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  graphdef, state = nnx.split(tiny_encoder)
  sharded = jax.device_put(state, state_shardings(state, mesh))
  assert sharded["blocks"]["feed_forward"]["w_1"]["kernel"][...].sharding.spec == P(
      None, "fsdp", "tensor")
  features = padded_features(tiny_encoder.config, LENGTHS, FRAMES)
  with jax.set_mesh(mesh):
    out = np.asarray(_encode(graphdef, sharded, features, LENGTHS))
  np.testing.assert_allclose(out, encode(tiny_encoder, features, LENGTHS), atol=1e-5)


def test_compute_dtype_bfloat16_stays_close(tiny_encoder):
  bf16 = dataclasses.replace(tiny_encoder.config, compute_dtype="bfloat16")
  bf16_graphdef, _ = abstract_module(lambda rngs: SpeechEncoder(bf16, rngs))
  features = padded_features(bf16, LENGTHS, FRAMES)
  out = np.asarray(_encode(bf16_graphdef, nnx.state(tiny_encoder), features, LENGTHS))
  assert out.dtype == jnp.bfloat16
  error = np.abs(out.astype(np.float32) - encode(tiny_encoder, features, LENGTHS)).max()
  assert 0 < error < 0.1, error


@pytest.mark.parametrize("override,message", [
    ("model.speech_encoder.num_heads=3", "model.speech_encoder.hidden_size=64 is not divisible by "
     "model.speech_encoder.num_heads=3"),
    ("model.speech_encoder.text_norm_query=16", "model.speech_encoder.text_norm_query=16 is not a "
     "row of the 16-row query table"),
    ("model.speech_encoder.num_mel_bins=5", "num_mel_bins x lfr_m = 35 must be even"),
    ("model.speech_encoder.window=hann", "model.speech_encoder.window='hann': expected one of"),
    ("model.speech_encoder.num_blocks=1", "model.speech_encoder.num_blocks=1 must be >= 2"),
    ("model.speech_encoder.tp_blocks=0", "model.speech_encoder.tp_blocks must be >= 1"),
    ("model.speech_encoder.hidden_sise=8", "unknown config key model.speech_encoder.hidden_sise"),
])
def test_bad_encoder_configs_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    load_config(CONFIG_ROOT / "model" / "tiny_speech.yaml", [override])
