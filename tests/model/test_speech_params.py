"""The release's speech tensors: a tiny release-layout checkpoint written with FunASR's module
names and shapes, read into omnijax's encoder and projector, computes what FunASR and the
release's projector compute; export gives back the same tensors bit for bit."""

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from omnijax.config import SpeechEncoderConfig
from omnijax.model.speech import encoded_frames
from omnijax.model.speech_params import (RELEASE_ENCODER_PREFIX, RELEASE_PROJECTOR_PREFIX,
                                         UNUSED_ENCODER_PREFIXES, TensorShapeError,
                                         encoder_from_tensors, encoder_tensor_names,
                                         encoder_tensors, projector_from_tensors,
                                         projector_tensor_names, projector_tensors)


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory, tiny_speech_model, sensevoice):
  """(path, FunASR encoder, torch projector): the audio tensors as the release's DreamModel
  names them (`model.audio_model` holds FunASR's SenseVoiceSmall as `.model`), beside a
  backbone tensor."""
  config = tiny_speech_model()
  encoder = sensevoice.build(config.speech_encoder, seed=11)
  projector = sensevoice.build_projector(config.speech_encoder.hidden_size, config.hidden_size,
                                         seed=12)
  tensors = {"model.embed_tokens.weight": np.zeros((8, config.hidden_size), np.float32)}
  tensors.update({RELEASE_ENCODER_PREFIX + name: value
                  for name, value in sensevoice.state_dict(encoder).items()})
  tensors.update({RELEASE_PROJECTOR_PREFIX + name: value
                  for name, value in sensevoice.state_dict(projector).items()})
  path = tmp_path_factory.mktemp("release") / "model.safetensors"
  save_file(tensors, str(path))
  return path, encoder, projector


def _load(path, config):
  with safe_open(str(path), framework="np") as checkpoint:
    encoder = encoder_from_tensors(
        config.speech_encoder, lambda name: checkpoint.get_tensor(RELEASE_ENCODER_PREFIX + name))
    projector = projector_from_tensors(
        config, lambda name: checkpoint.get_tensor(RELEASE_PROJECTOR_PREFIX + name))
  return encoder, projector


def test_release_layout_checkpoint_gives_funasr_outputs(release_checkpoint, tiny_speech_model,
                                                        sensevoice):
  path, reference_encoder, reference_projector = release_checkpoint
  config = tiny_speech_model()
  encoder, projector = _load(path, config)
  lengths = np.array([13, 6])
  features = np.random.default_rng(1).standard_normal((2, 13, 560)).astype(np.float32)
  features[1, 6:] = 0.0
  encoded = sensevoice.encode(reference_encoder, features, lengths)
  expected = sensevoice.project(reference_projector, encoded)
  ours_encoded = np.asarray(jax.jit(lambda encoder, x, n: encoder(x, n))(encoder, features,
                                                                          lengths))
  ours = np.asarray(jax.jit(lambda projector, x: projector(x))(projector, ours_encoded))
  for row, length in enumerate(lengths):
    valid = encoded_frames(length)
    np.testing.assert_allclose(ours_encoded[row, :valid], encoded[row, :valid], atol=1e-4)
    np.testing.assert_allclose(ours[row, :valid], expected[row, :valid], atol=1e-4)


def test_export_gives_back_every_audio_tensor_bit_for_bit(release_checkpoint, tiny_speech_model):
  path, _, _ = release_checkpoint
  config = tiny_speech_model()
  encoder, projector = _load(path, config)
  exported = {RELEASE_ENCODER_PREFIX + name: value
              for name, value in encoder_tensors(encoder).items()}
  exported.update({RELEASE_PROJECTOR_PREFIX + name: value
                   for name, value in projector_tensors(projector).items()})
  with safe_open(str(path), framework="np") as checkpoint:
    audio = [name for name in checkpoint.keys()
             if name.startswith((RELEASE_ENCODER_PREFIX, RELEASE_PROJECTOR_PREFIX))]
    unused = {name for name in audio
              if name.removeprefix(RELEASE_ENCODER_PREFIX).startswith(UNUSED_ENCODER_PREFIXES)}
    # Every audio tensor is either read or one of the named unused ones (the CTC head).
    assert unused == {RELEASE_ENCODER_PREFIX + "ctc.ctc_lo.weight",
                      RELEASE_ENCODER_PREFIX + "ctc.ctc_lo.bias"}
    assert set(exported) == set(audio) - unused
    assert set(exported) == (
        {RELEASE_ENCODER_PREFIX + name for name in encoder_tensor_names(config.speech_encoder)}
        | {RELEASE_PROJECTOR_PREFIX + name for name in projector_tensor_names(config)})
    for name, value in exported.items():
      original = checkpoint.get_tensor(name)
      assert value.dtype == original.dtype and np.array_equal(value, original), name


def test_missing_or_misshapen_tensors_are_named(release_checkpoint, tiny_speech_model):
  path, _, _ = release_checkpoint
  config = tiny_speech_model()
  with safe_open(str(path), framework="np") as checkpoint:
    tensors = {name.removeprefix(RELEASE_ENCODER_PREFIX): checkpoint.get_tensor(name)
               for name in checkpoint.keys() if name.startswith(RELEASE_ENCODER_PREFIX)}
  absent = "encoder.tp_encoders.1.self_attn.fsmn_block.weight"
  with pytest.raises(KeyError, match=absent):
    encoder_from_tensors(config.speech_encoder,
                         lambda name: {k: v for k, v in tensors.items() if k != absent}[name])
  narrow = dict(tensors)
  narrow["encoder.encoders0.0.self_attn.linear_q_k_v.weight"] = np.zeros((3 * 64, 80), np.float32)
  with pytest.raises(TensorShapeError, match=r"tensor encoder.encoders0.0.self_attn.linear_q_k_v"
                     r".weight: shape \(192, 80\), expected \(192, 560\) for parameter "
                     r"input_block/self_attn/linear_\w/kernel"):
    encoder_from_tensors(config.speech_encoder, narrow.__getitem__)
  # A filter of the wrong rank is refused before it is indexed.
  flat = dict(tensors)
  flat["encoder.encoders.1.self_attn.fsmn_block.weight"] = np.zeros((64, 5), np.float32)
  with pytest.raises(TensorShapeError, match=r"encoders.1.self_attn.fsmn_block.weight: shape "
                     r"\(64, 5\), expected \(64, 1, 5\) for parameter blocks/self_attn/fsmn"):
    encoder_from_tensors(config.speech_encoder, flat.__getitem__)


def test_release_encoder_reads_every_funasr_tensor_but_the_ctc_head(sensevoice):
  release = SpeechEncoderConfig()
  funasr_names = set(sensevoice.shapes(release))
  assert len(funasr_names) == 917
  assert encoder_tensor_names(release) == {
      name for name in funasr_names if not name.startswith(UNUSED_ENCODER_PREFIXES)}
