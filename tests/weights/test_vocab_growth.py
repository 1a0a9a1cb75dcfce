"""Starting from a text checkpoint (Dream-7B): plain import as a text layout, and `convert from-hf
--grow-vocab` into a bigger layout with the old rows bit-exact and the new ones drawn from the old
rows' statistics."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.weights import convert
from omnijax.config import Config, MeshConfig, VocabConfig
from omnijax.model.params_io import load_model
from omnijax.sharding import make_mesh
from omnijax.weights.vocab_growth import grow_rows

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Dream-like: 200 text ids, the specials from 200 with <|mask|> at 200 + 23, padded to 250 rows.
SOURCE_ROWS, TEXT = 250, 200
TARGET = VocabConfig(layout="compact", text_size=TEXT, n_image_codes=35, n_speech_codes=40)


@pytest.fixture(scope="module")
def dream_like(tmp_path_factory):
  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(
      vocab_size=SOURCE_ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, bos_token_id=TEXT,
      pad_token_id=TEXT, mask_token_id=TEXT + 23, tie_word_embeddings=False)
  path = tmp_path_factory.mktemp("dream_like")
  transformers.Qwen2ForCausalLM(hf_config).save_pretrained(path, safe_serialization=True)
  return path


def test_unknown_vocabulary_imports_as_a_text_layout_of_that_size(dream_like):
  config, model = convert.from_hf(dream_like)
  assert config.vocab == VocabConfig(layout="text", text_size=TEXT, n_image_codes=0,
                                     n_speech_codes=0)
  assert config.vocab_size == SOURCE_ROWS and model.embed_tokens[...].shape == (SOURCE_ROWS, 32)
  vocab = config.vocab.build()
  assert vocab.mask_id == TEXT + 23 and vocab.pad_id == TEXT and vocab.size == TEXT + 45
  # Without any special-token ids in config.json the last 45 rows are taken as the specials.
  assert convert.config_from_hf(
      {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
       "num_attention_heads": 4, "vocab_size": 300, "rope_theta": 1e4}).vocab.text_size == 255


def test_grow_vocab_keeps_old_rows_and_logits_and_is_usable_as_init_from(dream_like, tmp_path):
  _, source = convert.from_hf(dream_like)
  out = tmp_path / "grown"
  command = [sys.executable, "-m", "omnijax.cli", "convert", "from-hf", str(dream_like), str(out),
             "--grow-vocab", f"compact:{TEXT},35,40", "--seed", "3"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  config, grown = load_model(out)
  assert config.vocab == TARGET and config.vocab_size == TARGET.build().size == 320
  embed, head = np.asarray(grown.embed_tokens[...]), np.asarray(grown.lm_head[...])
  np.testing.assert_array_equal(embed[:SOURCE_ROWS], np.asarray(source.embed_tokens[...]))
  np.testing.assert_array_equal(head[:, :SOURCE_ROWS], np.asarray(source.lm_head[...]))
  # New rows come from the old text rows' distribution: near their mean, at their spread.
  old = np.asarray(source.embed_tokens[...])[:TEXT]
  new = embed[SOURCE_ROWS:]
  assert np.abs(new.mean(axis=0) - old.mean(axis=0)).max() < 4 * old.std() / np.sqrt(len(new))
  assert 0.5 < new.std() / old.std() < 2
  # Every old id's logit is unchanged; the new ids only add columns.
  tokens = jnp.asarray(np.arange(0, SOURCE_ROWS, 7, dtype=np.int32)[None])
  np.testing.assert_allclose(np.asarray(grown(tokens))[..., :SOURCE_ROWS],
                             np.asarray(source(tokens)), atol=1e-5)

  # The grown directory is a valid train.init_from for a model of the grown layout.
  from omnijax.train.loop import initial_params
  from omnijax.train.state import StateLayout
  train_config = Config(model=config)
  train_config = dataclasses.replace(
      train_config, train=dataclasses.replace(train_config.train, init_from=str(out)))
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), jax.devices()[:1])
  params = initial_params(train_config, StateLayout.create(train_config, mesh), mesh)
  np.testing.assert_array_equal(np.asarray(params["embed_tokens"]), embed)

  # Seeded: the same seed gives the same rows, another seed other rows.
  _, again = convert.from_hf(dream_like, grow_vocab=TARGET, seed=3)
  _, other = convert.from_hf(dream_like, grow_vocab=TARGET, seed=4)
  np.testing.assert_array_equal(np.asarray(again.embed_tokens[...]), embed)
  assert not np.array_equal(np.asarray(other.embed_tokens[...])[SOURCE_ROWS:], new)


def test_grown_rows_follow_the_mean_and_covariance_of_the_old_ones():
  rng = np.random.default_rng(0)
  mixing = rng.normal(size=(6, 6))
  old = (rng.normal(size=(20000, 6)) @ mixing + np.arange(6)).astype(np.float32)
  grown = grow_rows(old, 60000, 20000, np.random.default_rng(1))
  assert grown.shape == (60000, 6) and grown.dtype == np.float32
  np.testing.assert_array_equal(grown[:20000], old)
  np.testing.assert_allclose(grown[20000:].mean(axis=0), old.mean(axis=0), atol=0.1)
  np.testing.assert_allclose(np.cov(grown[20000:].T), np.cov(old.T), atol=0.15 * np.abs(
      np.cov(old.T)).max())


def test_growing_into_a_layout_whose_ids_do_not_line_up_fails_with_one_line(dream_like, tmp_path):
  from omnijax.cli import main
  out = tmp_path / "never"
  for layout, message in [("omni_diffusion", "special tokens start at id 200"),
                          ("compact:200,1,1", "already has 250 rows")]:
    result = subprocess.run(
        [sys.executable, "-m", "omnijax.cli", "convert", "from-hf", str(dream_like), str(out),
         "--grow-vocab", layout], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert message in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
  assert main(["convert", "from-hf", str(dream_like), str(out), "--grow-vocab", "sparse:1"]) == 2
