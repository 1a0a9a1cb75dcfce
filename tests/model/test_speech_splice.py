"""Splicing projected speech over the `<|context_of_audio|>` placeholders, as the release does:
<|begin_of_audio|> + (T + 4) placeholders + <|end_of_audio|>, in order, several clips per row."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.model.build import module_from_arrays
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
