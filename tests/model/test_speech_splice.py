"""Splicing projected speech over the `<|context_of_audio|>` placeholders, as the release does:
<|begin_of_audio|> + (T + 4) placeholders + <|end_of_audio|>, in order, several clips per row;
and the model that holds the encoder and projector and takes speech in its forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.config import CONFIG_ROOT, load_config
from omnijax.model.build import abstract_model, create_model, module_from_arrays
from omnijax.model.speech import (SpeechEncoder, SpeechProjector, encoded_frames,
                                  speech_embeddings, splice_speech)

BEGIN, CONTEXT, END, TEXT = 1, 2, 3, 7


def _row(*parts, length):
  """Token ids: ints are text tokens, ("audio", n) is a clip with n placeholders."""
  ids = []
  for part in parts:
    ids += [BEGIN, *[CONTEXT] * part[1], END] if isinstance(part, tuple) else [part]
  return ids + [0] * (length - len(ids))


def test_each_placeholder_takes_the_next_valid_frame_of_its_rows_clips():
  width, frames = 3, 5
  # Row 0: two clips (4 then 2 valid frames) between text; row 1: one clip of 5, then one
  # placeholder too many; row 2: no speech at all.
  input_ids = jnp.array([_row(TEXT, ("audio", 4), TEXT, ("audio", 2), length=14),
                         _row(("audio", 6), TEXT, length=14),
                         _row(TEXT, TEXT, TEXT, length=14)])
  speech = jnp.arange(3 * 2 * frames * width, dtype=jnp.float32).reshape(3, 2, frames, width)
  speech_lengths = jnp.array([[4, 2], [5, 0], [0, 0]])
  tokens = -jnp.ones((3, 14, width))
  out = np.asarray(splice_speech(tokens, input_ids, speech, speech_lengths, CONTEXT))
  expected = -np.ones((3, 14, width))
  expected[0, 2:6] = speech[0, 0, :4]
  expected[0, 9:11] = speech[0, 1, :2]
  expected[1, 1:6] = speech[1, 0, :5]  # the sixth placeholder keeps its token embedding
  np.testing.assert_array_equal(out, expected)


def test_gradients_reach_exactly_the_spliced_frames():
  input_ids = jnp.array([_row(("audio", 3), TEXT, ("audio", 1), length=9)])
  speech = jnp.ones((1, 2, 4, 2))
  grad = jax.grad(lambda s: splice_speech(jnp.zeros((1, 9, 2)), input_ids, s,
                                          jnp.array([[3, 1]]), CONTEXT).sum())(speech)
  np.testing.assert_array_equal(grad[0, :, :, 0], [[1, 1, 1, 0], [1, 0, 0, 0]])


def _tiny_speech_modules(config):
  rng = np.random.default_rng(0)
  fill = lambda path, shape: rng.normal(size=shape) / np.sqrt(shape[-1])
  return (module_from_arrays(lambda rngs: SpeechEncoder(config.speech_encoder, rngs), fill),
          module_from_arrays(lambda rngs: SpeechProjector(config, rngs), fill))


def test_speech_embeddings_encode_every_clip_and_skip_a_batch_without_speech(tiny_speech_model):
  config = tiny_speech_model()
  encoder, projector = _tiny_speech_modules(config)
  rng = np.random.default_rng(1)
  features = rng.standard_normal((2, 2, 6, 560)).astype(np.float32)
  lengths = np.array([[6, 3], [4, 0]])
  embed = jax.jit(lambda encoder, projector, features, lengths: speech_embeddings(
      encoder, projector, features, lengths))
  projected, counts = embed(encoder, projector, features, lengths)
  assert projected.shape == (2, 2, 10, config.hidden_size)
  np.testing.assert_array_equal(counts, [[10, 7], [8, 0]])
  alone = jax.jit(lambda encoder, projector, features, lengths: projector(
      encoder(features, lengths)))
  for row, clip in [(0, 0), (0, 1), (1, 0)]:
    one = alone(encoder, projector, features[row, clip:clip + 1], lengths[row, clip:clip + 1])
    valid = encoded_frames(lengths[row, clip])
    np.testing.assert_allclose(projected[row, clip, :valid], one[0, :valid], atol=1e-5)
  silent, silent_counts = embed(encoder, projector, features, np.zeros_like(lengths))
  np.testing.assert_array_equal(silent, 0.0)
  np.testing.assert_array_equal(silent_counts, 0)
  assert embed._cache_size() == 1  # one compiled shape for batches with and without speech


def test_the_encoder_runs_only_inside_the_branch_taken_when_there_is_speech(tiny_speech_model):
  config = tiny_speech_model()
  encoder, projector = _tiny_speech_modules(config)
  graphdef, state = nnx.split((encoder, projector))

  def embed(state, features, lengths):
    encoder, projector = nnx.merge(graphdef, state)
    return speech_embeddings(encoder, projector, features, lengths)

  jaxpr = jax.make_jaxpr(embed)(state, np.zeros((1, 1, 4, 560), np.float32),
                                np.zeros((1, 1), np.int32)).jaxpr
  primitives = {str(eqn.primitive) for eqn in jaxpr.eqns}
  assert "cond" in primitives and "dot_general" not in primitives and "scan" not in primitives


# --- the model owns its speech input ---------------------------------------------------------


def _speech_rows(vocab, clips_per_row, length):
  """Token ids (text, then each clip as <|begin_of_audio|> + n placeholders + <|end_of_audio|>,
  text between) and, per row, the placeholder positions in order."""
  rows, slots = [], []
  for clips in clips_per_row:
    ids = [11]
    for count in clips:
      ids += [vocab.begin_audio_id, *[vocab.audio_context_id] * count, vocab.end_audio_id, 12]
    ids += [13] * (length - len(ids))
    rows.append(ids)
    slots.append(np.flatnonzero(np.array(ids) == vocab.audio_context_id))
  return jnp.array(rows), slots


def test_the_model_splices_each_clips_projected_frames_into_its_rows_placeholders(
    tiny_speech_model):
  config = tiny_speech_model()
  vocab = config.vocab.build()
  model = create_model(config, seed=0)
  rng = np.random.default_rng(2)
  features = rng.standard_normal((2, 2, 5, 560)).astype(np.float32)
  lengths = np.array([[5, 2], [3, 0]])
  input_ids, slots = _speech_rows(vocab, [[9, 6], [7]], length=24)
  forward = jax.jit(lambda model, ids, features, lengths: model(
      ids, speech_features=features, speech_lengths=lengths))
  ours = np.asarray(forward(model, input_ids, features, lengths))
  # By hand: each clip encoded alone, projected, its valid frames written one by one over the
  # row's placeholders in order, through the backbone's input-embedding seam.
  embeddings = np.zeros((2, 24, config.hidden_size), np.float32)
  mask = np.zeros((2, 24), bool)
  for row, clips in enumerate([[0, 1], [0]]):
    frames = np.concatenate([
        np.asarray(model.speech_projector(model.speech_encoder(
            features[row, clip:clip + 1], lengths[row, clip:clip + 1])))[0, :lengths[row, clip] + 4]
        for clip in clips])
    assert len(frames) == len(slots[row])
    embeddings[row, slots[row]] = frames
    mask[row, slots[row]] = True
  expected = np.asarray(model(input_ids, input_embeddings=embeddings, input_embedding_mask=mask))
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  # The speech reaches the logits: other features, other outputs (a constant shift would not:
  # the encoder's first LayerNorm removes it).
  other = rng.standard_normal(features.shape).astype(np.float32)
  assert np.abs(np.asarray(forward(model, input_ids, other, lengths)) - ours).max() > 1e-3


def test_a_batch_without_audio_is_the_text_model_and_shares_its_compilation(tiny_speech_model):
  config = tiny_speech_model()
  model = create_model(config, seed=0)
  input_ids, _ = _speech_rows(config.vocab.build(), [[6], [5]], length=16)
  forward = jax.jit(lambda model, ids, features, lengths: model(
      ids, speech_features=features, speech_lengths=lengths))
  features = np.ones((2, 1, 4, 560), np.float32)
  silent = forward(model, input_ids, features, np.zeros((2, 1), np.int32))
  np.testing.assert_array_equal(silent, model(input_ids))  # placeholders keep their embedding
  forward(model, input_ids, features, np.full((2, 1), 2, np.int32))
  assert forward._cache_size() == 1


def test_the_backbone_is_the_same_with_or_without_an_encoder(tiny_speech_model):
  """At one seed the backbone's weights do not depend on the encoder (created after it)."""
  with_encoder = nnx.to_pure_dict(nnx.state(create_model(tiny_speech_model(), seed=4)))
  without = nnx.to_pure_dict(nnx.state(create_model(
      tiny_speech_model("model.speech_encoder=null"), seed=4)))
  assert set(with_encoder) - set(without) == {"speech_encoder", "speech_projector"}
  for a, b in zip(jax.tree.leaves(without), jax.tree.leaves({k: with_encoder[k]
                                                              for k in without})):
    np.testing.assert_array_equal(a, b)


def test_speech_for_a_model_without_an_encoder_or_of_the_wrong_shape_is_refused(
    tiny_speech_model):
  ids = jnp.zeros((1, 8), jnp.int32)
  features, lengths = jnp.zeros((1, 1, 4, 560)), jnp.zeros((1, 1), jnp.int32)
  text_only = create_model(tiny_speech_model("model.speech_encoder=null"))
  with pytest.raises(ValueError, match="no speech encoder"):
    text_only(ids, speech_features=features, speech_lengths=lengths)
  model = create_model(tiny_speech_model())
  with pytest.raises(ValueError, match="given together"):
    model(ids, speech_features=features)
  with pytest.raises(ValueError, match=r"speech_lengths \(1, 2\) \[batch, clips\]"):
    model(ids, speech_features=features, speech_lengths=jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("model_file,overrides", [
    ("tiny_speech.yaml", []),
    ("tiny_speech.yaml", ["model.scan_layers=false", "model.tie_embeddings=true"]),
    ("omni7b.yaml", ["model.speech_encoder={}"]),  # the release backbone and encoder
])
def test_param_count_counts_the_encoder_and_projector(model_file, overrides):
  config = load_config(CONFIG_ROOT / "model" / model_file, overrides).model
  _, state = abstract_model(config)
  built = {key: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state[key]))
           for key in ("speech_encoder", "speech_projector")}
  assert built["speech_encoder"] == config.speech_encoder.param_count()
  assert sum(built.values()) == config.speech_param_count()
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state)) == config.param_count()
