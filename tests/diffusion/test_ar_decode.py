"""Autoregressive decoding with the KV cache against recomputing every token, per-row stopping,
row independence, sampling and sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.config import MeshConfig, load_config
from omnijax.diffusion import ar_decode
from omnijax.diffusion.settings import DecodeSettings
from omnijax.model.build import create_model
from omnijax.sharding import make_mesh


@pytest.fixture(scope="module")
def tiny():
  config = load_config("tests/train/tiny_experiment.yaml").model
  # A larger init spreads the logits, so greedy choices are far from ties.
  config = dataclasses.replace(config, init_std=0.5)
  return config, create_model(config, seed=0), config.vocab.build()


def recompute_every_token(model, vocab, prompt_ids, canvas):
  """One row, a Python loop without a cache: the whole sequence through the causal model for
  every token, greedy, stopping after <|im_end|> or <|endoftext|>."""
  forward = jax.jit(lambda ids, segment_ids: model(ids, segment_ids, causal=True))
  sequence = list(prompt_ids)
  out = np.full(canvas, vocab.pad_id, np.int32)
  width = 32  # one compiled shape: the sequence right-padded (segment 0, never attended)
  for index in range(canvas):
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(sequence)] = sequence
    segment_ids = (np.arange(width) < len(sequence)).astype(np.int32)[None]
    logits = np.array(forward(jnp.asarray(ids), jnp.asarray(segment_ids)),
                      np.float32)[0, len(sequence) - 1]
    logits[vocab.size:] = -np.inf
    logits[vocab.mask_id] = -np.inf
    out[index] = token = int(logits.argmax())
    sequence.append(token)
    if token in (vocab.im_end_id, vocab.pad_id):
      break
  return out


def prompts_of(vocab, lengths, seed=1):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab.text_size, n).astype(np.int32) for n in lengths]


def with_im_end_like(model, vocab, token):
  """The model with <|im_end|>'s lm_head column a little above `token`'s: greedy decoding now
  stops wherever it would have produced `token` (with a positive logit)."""
  model = nnx.clone(model)
  model.lm_head[...] = model.lm_head[...].at[:, vocab.im_end_id].set(
      1.05 * model.lm_head[...][:, token])
  return model


def test_cached_decoding_equals_recomputing_every_token_and_rows_stop_on_their_own(tiny):
  _, model, vocab = tiny
  prompts = prompts_of(vocab, (3, 17, 9))
  settings = DecodeSettings(canvas=10, steps=1)
  free = ar_decode.decode(model, vocab, prompts, settings)
  # Make every row stop early: <|im_end|> takes the place of a token row 0 produced.
  model = with_im_end_like(model, vocab, int(free.canvases[0][4]))
  result = ar_decode.decode(model, vocab, prompts, settings)
  stopped = 0
  for row, prompt_ids in enumerate(prompts):
    expected = recompute_every_token(model, vocab, prompt_ids, 10)
    np.testing.assert_array_equal(result.canvases[row], expected)
    ends = np.flatnonzero(expected == vocab.im_end_id)
    passes = ends[0] + 1 if len(ends) else 10
    assert result.forward_passes[row] == passes  # one forward pass per token, its stop included
    stopped += passes < 10
  assert stopped >= 1 and result.loop_steps == max(result.forward_passes)
  assert (result.canvases[0][5:] == vocab.pad_id).all() and result.canvases[0][4] == vocab.im_end_id


def test_a_row_alone_decodes_as_in_a_batch(tiny):
  _, model, vocab = tiny
  prompts = prompts_of(vocab, (3, 17, 9), seed=2)
  uncond = [p[:2] for p in prompts]
  for settings in (DecodeSettings(canvas=8, steps=1),
                   DecodeSettings(canvas=8, steps=1, repeat_penalty=1.3, top_p=0.9, cfg=1.0)):
    guided = settings.cfg > 0
    batch = ar_decode.decode(model, vocab, prompts, settings,
                             uncond_prompts=uncond if guided else None)
    for row in range(3):
      alone = ar_decode.decode(model, vocab, prompts[row:row + 1], settings,
                               uncond_prompts=uncond[row:row + 1] if guided else None)
      np.testing.assert_array_equal(alone.canvases[0], batch.canvases[row])
  # CFG and the repetition penalty change the tokens: they are applied.
  plain = ar_decode.decode(model, vocab, prompts, DecodeSettings(canvas=8, steps=1))
  assert any((a != b).any() for a, b in zip(plain.canvases, batch.canvases))


def test_sampling_follows_the_seed_and_diffusion_only_settings_do_not_apply(tiny):
  _, model, vocab = tiny
  prompts = prompts_of(vocab, (5, 6), seed=3)
  settings = DecodeSettings(canvas=8, steps=1, temperature=1.5)
  sampled = lambda **changes: ar_decode.decode(model, vocab, prompts, settings.replace(**changes))
  first, again, other = sampled(seed=0), sampled(seed=0), sampled(seed=1)
  for a, b in zip(first.canvases, again.canvases):
    np.testing.assert_array_equal(a, b)
  assert any((a != b).any() for a, b in zip(first.canvases, other.canvases))
  for canvas in first.canvases:
    assert ((canvas < vocab.size) & (canvas != vocab.mask_id)).all()
  # Steps, confidence, blocks, threshold and prefill are diffusion's: the same tokens.
  diffusion_only = sampled(seed=0, steps=3, alg="entropy", block_size=2, threshold=0.5,
                           position_penalty=2.0, prefill={0: vocab.begin_audio_id})
  for a, b in zip(first.canvases, diffusion_only.canvases):
    np.testing.assert_array_equal(a, b)


def test_runs_sharded_on_a_mesh_with_the_same_tokens(tiny):
  config, model, vocab = tiny
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = create_model(config, mesh, seed=0)
  prompts = prompts_of(vocab, (4, 11, 6), seed=4)  # 3 rows on 4 batch shards
  settings = DecodeSettings(canvas=6, steps=1)
  expected = ar_decode.decode(model, vocab, prompts, settings)
  got = ar_decode.decode(sharded, vocab, prompts, settings)
  for a, b in zip(expected.canvases, got.canvases):
    np.testing.assert_array_equal(a, b)
  assert ar_decode.decode(model, vocab, [], settings).canvases == []
