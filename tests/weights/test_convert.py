"""HF import/export: logit parity against transformers' Qwen2, round trips, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.weights import convert
from omnijax.config import VocabConfig
from omnijax.model.build import create_model
from omnijax.sharding import make_mesh
from omnijax.config import MeshConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# compact layout 200 text + 45 specials + 40 speech + 35 image codes = 320 ids.
VOCAB = VocabConfig(layout="compact", text_size=200, n_image_codes=35, n_speech_codes=40)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(
      vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
      tie_word_embeddings=False, max_position_embeddings=512, attn_implementation="eager")
  model = transformers.Qwen2ForCausalLM(hf_config).eval()
  with torch.no_grad():  # random non-zero biases/norms so every tensor matters in the check
    for name, param in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
  path = tmp_path_factory.mktemp("qwen2")
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def _batch():
  rng = np.random.default_rng(0)
  # Row 0: three packed segments and a padding tail; row 1: one segment, no padding.
  segment_ids = np.array([[1] * 7 + [2] * 5 + [3] * 6 + [0] * 6, [1] * 24], np.int32)
  tokens = rng.integers(0, 320, size=segment_ids.shape).astype(np.int32)
  return tokens, segment_ids


def _segment_positions(segment_ids):
  positions = np.zeros_like(segment_ids)
  for b, row in enumerate(segment_ids):
    for i in range(1, len(row)):
      positions[b, i] = 0 if row[i] != row[i - 1] else positions[b, i - 1] + 1
  return positions


def _transformers_logits(model, tokens, segment_ids):
  allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
  # transformers 5 reads a 4-D float mask as additive: 0 = attend, large negative = blocked.
  additive = np.where(allowed, 0.0, -1e9).astype(np.float32)[:, None]
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                attention_mask=torch.from_numpy(additive),
                position_ids=torch.from_numpy(_segment_positions(segment_ids).astype(np.int64)))
  return out.logits.numpy()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logit_parity_with_transformers(hf_dir, scan_layers):
  path, hf_model = hf_dir
  config, model = convert.from_hf(path, vocab=VOCAB, scan_layers=scan_layers)
  assert config.vocab_size == 320 and config.num_layers == 3 and config.rope_theta == 10000.0
  tokens, segment_ids = _batch()
  ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(segment_ids)))
  theirs = _transformers_logits(hf_model, tokens, segment_ids)
  valid = segment_ids != 0
  error = np.abs(ours - theirs)[valid].max()
  print(f"max |logit diff| vs transformers (fp32): {error:.2e}")
  assert error <= 1e-4
  assert np.isfinite(ours).all()  # padded rows are finite too


def test_parity_holds_on_a_sharded_mesh(hf_dir):
  path, hf_model = hf_dir
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  _, model = convert.from_hf(path, vocab=VOCAB, mesh=mesh)
  assert model.embed_tokens[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  tokens, segment_ids = _batch()
  with jax.set_mesh(mesh):
    ours = np.asarray(jax.jit(lambda t, s: model(t, s))(tokens, segment_ids))
  theirs = _transformers_logits(hf_model, tokens, segment_ids)
  assert np.abs(ours - theirs)[segment_ids != 0].max() <= 1e-4


def test_export_import_round_trip_is_bit_exact(tmp_path):
  from omnijax.config import load_config
  config = load_config(None, ["model.num_layers=2", "model.vocab_pad_multiple=64"]).model
  model = create_model(config, seed=3)
  convert.to_hf(model, config, tmp_path / "a")
  config_b, model_b = convert.from_hf(tmp_path / "a")
  assert config_b.vocab == config.vocab and config_b.vocab_size == config.vocab_size
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(model_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Several shards: the same tensors, read back through the index.
  written = convert.to_hf(model_b, config_b, tmp_path / "b", max_shard_bytes=50_000)
  assert len(written) > 1 and (tmp_path / "b" / "model.safetensors.index.json").is_file()
  _, model_c = convert.from_hf(tmp_path / "b")
  for a, c in zip(jax.tree.leaves(model), jax.tree.leaves(model_c)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_exported_checkpoint_loads_in_transformers(tmp_path):
  from omnijax.config import load_config
  config = load_config(None, ["model.num_layers=2", "model.scan_layers=false"]).model
  model = create_model(config, seed=1)
  convert.to_hf(model, config, tmp_path)
  hf_model = transformers.Qwen2ForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  tokens = np.arange(16, dtype=np.int32)[None] % config.vocab_size
  segment_ids = np.ones_like(tokens)
  ours = np.asarray(model(jnp.asarray(tokens)))
  assert np.abs(ours - _transformers_logits(hf_model, tokens, segment_ids)).max() <= 1e-4


def test_both_rope_config_styles_load():
  base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=176264)
  old_style = convert.config_from_hf({**base, "rope_theta": 1e6})
  new_style = convert.config_from_hf(
      {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
  assert old_style.rope_theta == new_style.rope_theta == 1e6
  assert old_style.vocab.layout == "omni_diffusion"
  with pytest.raises(convert.CheckpointError, match="rope_type|RoPE type 'yarn'"):
    convert.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})


def test_bad_checkpoints_fail_clearly(hf_dir, tmp_path):
  path, _ = hf_dir
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
  with pytest.raises(convert.CheckpointError, match="pickle.*refused"):
    convert.from_hf(tmp_path, vocab=VOCAB)
  # A config that disagrees with the tensors names the tensor and both shapes.
  bad = json.loads((path / "config.json").read_text())
  bad["intermediate_size"] = 80
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  (wrong / "config.json").write_text(json.dumps(bad))
  (wrong / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
  with pytest.raises(convert.CheckpointError, match=r"mlp\.\w+_proj\.weight.*shape.*expected"):
    convert.from_hf(wrong, vocab=VOCAB)


def test_unknown_tensors_are_named_and_destinations_must_be_empty(tmp_path):
  from omnijax.config import load_config
  from safetensors.numpy import load_file, save_file
  config = load_config(None, ["model.num_layers=1"]).model
  convert.to_hf(create_model(config, seed=0), config, tmp_path / "hf")
  with pytest.raises(convert.CheckpointError, match="already holds a checkpoint"):
    convert.to_hf(create_model(config, seed=0), config, tmp_path / "hf")
  tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
  tensors["model.layers.0.extra.weight"] = np.ones((2,), np.float32)
  save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
  with pytest.raises(convert.CheckpointError, match="model.layers.0.extra.weight .* not a param"):
    convert.from_hf(tmp_path / "hf")


def test_omnijax_model_directory_round_trip_and_cli(tmp_path, hf_dir):
  from omnijax.cli import main
  from omnijax.model.params_io import load_model, save_model
  path, _ = hf_dir
  assert main(["convert", "from-hf", str(path), str(tmp_path / "model"),
               "--vocab", "compact:200,35,40"]) == 0
  config, model = load_model(tmp_path / "model")
  _, reference = convert.from_hf(path, vocab=VOCAB)
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  _, sharded = load_model(tmp_path / "model", mesh)
  assert sharded.lm_head[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert main(["convert", "to-hf", str(tmp_path / "model"), str(tmp_path / "back")]) == 0
  _, back = convert.from_hf(tmp_path / "back")
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  save_model(back, config, tmp_path / "model")  # overwriting an omnijax model directory works
