"""The release's speech input through `omnijax convert`: a tiny release-layout checkpoint (the
backbone beside FunASR's SenseVoiceSmall and the release's projector, by the release's tensor
names, and an am.mvn) imports whole and encodes as FunASR does; export gives back every tensor
and the CMVN statistics bit for bit; a checkpoint without audio imports without the encoder;
bad audio tensors and statistics are named in one line."""

import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from omnijax.cli import main
from omnijax.config import MeshConfig
from omnijax.model.build import create_model
from omnijax.model.params_io import load_model
from omnijax.model.speech import encoded_frames
from omnijax.model.speech_params import RELEASE_ENCODER_PREFIX, RELEASE_PROJECTOR_PREFIX
from omnijax.sharding import make_mesh, path_str
from omnijax.weights import convert

ENCODER = RELEASE_ENCODER_PREFIX


def flat(model) -> dict[str, np.ndarray]:
  return {path_str(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(model)}


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_speech_model, sensevoice, write_am_mvn):
  """(directory, FunASR encoder, torch projector, the backbone written there)."""
  config = tiny_speech_model()
  text_config = tiny_speech_model("model.speech_encoder=null")
  backbone = create_model(text_config, seed=5)
  path = tmp_path_factory.mktemp("release") / "omni_diffusion"
  convert.to_hf(backbone, text_config, path)
  encoder = sensevoice.build(config.speech_encoder, seed=11)
  projector = sensevoice.build_projector(config.speech_encoder.hidden_size, config.hidden_size,
                                         seed=12)
  tensors = load_file(str(path / "model.safetensors"))
  tensors.update({ENCODER + name: value
                  for name, value in sensevoice.state_dict(encoder).items()})
  tensors.update({RELEASE_PROJECTOR_PREFIX + name: value
                  for name, value in sensevoice.state_dict(projector).items()})
  save_file(tensors, str(path / "model.safetensors"))
  rng = np.random.default_rng(3)
  write_am_mvn(path / "am.mvn", rng.normal(size=560).astype(np.float32),
               rng.uniform(0.5, 2.0, size=560).astype(np.float32))
  return path, encoder, projector, backbone


def tagged_copy(release_dir, tmp_path, speech_encoder):
  """The checkpoint with its encoder's sizes in config.json, as omnijax's export writes them."""
  copy = shutil.copytree(release_dir, tmp_path / "tagged")
  hf_config = json.loads((copy / "config.json").read_text())
  hf_config[convert.SPEECH_CONFIG_KEY] = dict(
      hidden_size=speech_encoder.hidden_size, num_heads=speech_encoder.num_heads,
      mlp_size=speech_encoder.mlp_size, num_blocks=speech_encoder.num_blocks,
      tp_blocks=speech_encoder.tp_blocks, fsmn_kernel_size=speech_encoder.fsmn_kernel_size)
  (copy / "config.json").write_text(json.dumps(hf_config))
  return copy


def test_a_release_layout_checkpoint_imports_whole_and_encodes_as_funasr(
    release, tiny_speech_model, sensevoice):
  path, reference_encoder, reference_projector, backbone = release
  speech_encoder = tiny_speech_model().speech_encoder
  config, model = convert.from_hf(path, speech_encoder=speech_encoder)
  assert config.speech_encoder == speech_encoder
  ours = flat(model)
  for name, value in flat(backbone).items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  lengths = np.array([11, 4])
  features = np.random.default_rng(1).standard_normal((2, 11, 560)).astype(np.float32)
  features[1, 4:] = 0.0
  encoded = sensevoice.encode(reference_encoder, features, lengths)
  projected = sensevoice.project(reference_projector, encoded)
  ours_encoded = np.asarray(model.speech_encoder(features, lengths))
  ours_projected = np.asarray(model.speech_projector(ours_encoded))
  worst = 0.0
  for row, length in enumerate(lengths):
    valid = encoded_frames(length)
    worst = max(worst, float(np.abs(ours_encoded[row, :valid] - encoded[row, :valid]).max()))
    np.testing.assert_allclose(ours_projected[row, :valid], projected[row, :valid], atol=1e-4)
  assert worst <= 1e-4, worst


def test_export_then_import_is_bit_exact_with_the_cmvn_statistics(release, tiny_speech_model,
                                                                  tmp_path, capsys):
  path, *_ = release
  source = tagged_copy(path, tmp_path, tiny_speech_model().speech_encoder)
  assert main(["convert", "from-hf", str(source), str(tmp_path / "model")]) == 0
  assert "holds no speech encoder" not in capsys.readouterr().out
  assert (tmp_path / "model" / "am.mvn").read_bytes() == (path / "am.mvn").read_bytes()
  config, model = load_model(tmp_path / "model")
  assert config.speech_encoder == tiny_speech_model().speech_encoder
  _, sharded = load_model(tmp_path / "model", make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
  assert sharded.speech_encoder.blocks.self_attn.linear_q.kernel[...].sharding.spec == P(
      None, "fsdp", "tensor")
  assert main(["convert", "to-hf", str(tmp_path / "model"), str(tmp_path / "back")]) == 0
  assert (tmp_path / "back" / "am.mvn").read_bytes() == (path / "am.mvn").read_bytes()
  # Every tensor of the release's comes back bit for bit, but SenseVoice's unused CTC head.
  original, exported = (load_file(str(d / "model.safetensors")) for d in (path, tmp_path / "back"))
  assert set(exported) == {name for name in original if not name.startswith(ENCODER + "ctc.")}
  for name, value in exported.items():
    assert value.dtype == original[name].dtype and np.array_equal(value, original[name]), name
  # ... and imports again into the same model.
  again_config, again = convert.from_hf(tmp_path / "back")
  assert again_config == config
  for (name, a), b in zip(flat(model).items(), flat(again).values()):
    np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_checkpoint_without_audio_tensors_imports_without_the_encoder(release, tmp_path,
                                                                         capsys):
  path, *_ = release
  source = shutil.copytree(path, tmp_path / "text")
  tensors = load_file(str(source / "model.safetensors"))
  save_file({name: value for name, value in tensors.items() if not name.startswith(
      (ENCODER, RELEASE_PROJECTOR_PREFIX))}, str(source / "model.safetensors"))
  (source / "am.mvn").unlink()
  assert main(["convert", "from-hf", str(source), str(tmp_path / "model")]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[-1] == (f"{source} holds no speech encoder ({ENCODER}*): imported for text, images "
                     "and discrete speech codes only")
  config, model = load_model(tmp_path / "model")
  assert config.speech_encoder is None and model.speech_encoder is None
  assert not (tmp_path / "model" / "am.mvn").exists()


def _refused(capsys, *args) -> str:
  """Runs `omnijax convert ...`: exit 1 and one line on stderr, returned."""
  assert main(["convert", *map(str, args)]) == 1
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1, lines
  return lines[0]


def _rewrite(directory, change):
  tensors = load_file(str(directory / "model.safetensors"))
  change(tensors)
  save_file(tensors, str(directory / "model.safetensors"))


def test_bad_audio_tensors_and_statistics_are_named_in_one_line(release, tiny_speech_model,
                                                                tmp_path, capsys):
  path, *_ = release
  source = tagged_copy(path, tmp_path, tiny_speech_model().speech_encoder)
  dest = tmp_path / "model"
  # The release's sizes unless config.json says otherwise: the tiny encoder's tensors misfit.
  assert _refused(capsys, "from-hf", path, dest) == (
      f"omnijax convert: tensor {ENCODER}encoder.after_norm.bias in model.safetensors has shape "
      "(64,), expected (512,) for speech_encoder/after_norm/bias (the speech encoder's sizes: "
      "config.json's omnijax_speech_encoder, else the release's SenseVoiceSmall)")
  fsmn = ENCODER + "encoder.tp_encoders.1.self_attn.fsmn_block.weight"
  saved = load_file(str(source / "model.safetensors"))[fsmn]
  _rewrite(source, lambda tensors: tensors.update({fsmn: saved[:, :, :3]}))
  assert _refused(capsys, "from-hf", source, dest) == (
      f"omnijax convert: tensor {fsmn} in model.safetensors has shape (64, 1, 3), expected "
      "(64, 1, 5) for speech_encoder/tp_blocks/self_attn/fsmn (the speech encoder's sizes: "
      "config.json's omnijax_speech_encoder, else the release's SenseVoiceSmall)")
  _rewrite(source, lambda tensors: tensors.pop(fsmn))
  assert _refused(capsys, "from-hf", source, dest) == (
      f"omnijax convert: tensor {fsmn} is missing from the checkpoint")
  _rewrite(source, lambda tensors: tensors.update({fsmn: saved,
                                                   ENCODER + "encoder.extra.weight": saved}))
  assert "encoder.extra.weight in model.safetensors is not a parameter" in _refused(
      capsys, "from-hf", source, dest)
  _rewrite(source, lambda tensors: tensors.pop(ENCODER + "encoder.extra.weight"))
  (source / "am.mvn").write_text((source / "am.mvn").read_text().replace("<Rescale>", "<Scale>"))
  assert _refused(capsys, "from-hf", source, dest) == (
      f"omnijax convert: {source / 'am.mvn'}: no <Rescale> vector; not a Kaldi nnet am.mvn")
  (source / "am.mvn").unlink()
  assert _refused(capsys, "from-hf", source, dest) == (
      f"omnijax convert: {source / 'am.mvn'}: missing; the speech encoder's CMVN statistics "
      "(FunASR's am.mvn) belong beside its weights")
  assert not dest.exists()
  # Export needs the statistics too, and writes nothing without them.
  shutil.copy(path / "am.mvn", source / "am.mvn")
  assert main(["convert", "from-hf", str(source), str(dest)]) == 0
  (dest / "am.mvn").unlink()
  assert _refused(capsys, "to-hf", dest, tmp_path / "back").startswith(
      f"omnijax convert: {dest / 'am.mvn'}: missing")
  assert not (tmp_path / "back").exists()
