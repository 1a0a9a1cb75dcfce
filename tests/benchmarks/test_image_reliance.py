"""`benchmarks/image_reliance.py`: the image swap, and the own/swapped scores on stand-in models
whose dependence on the image is known."""

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.data.toyworld.world import ToyWorldSpec, build

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import image_reliance  # noqa: E402


@pytest.fixture(scope="module")
def world():
  spec = ToyWorldSpec(n=40, grid=8)
  captions = [s for s in build(spec).samples["train"] if s.task == "caption"]
  # Samples of one prompt (images in the same columns), of distinct lengths: a stand-in model
  # that does not read the image still tells them apart.
  span = image_reliance.image_span(captions[0].tokens, spec.vocab)
  by_length = {len(s.tokens): s for s in captions
               if image_reliance.image_span(s.tokens, spec.vocab) == span}
  assert len(by_length) >= 3
  return spec.vocab, list(by_length.values())


def test_the_swap_replaces_exactly_the_image_codes(world):
  vocab, samples = world
  spans = [image_reliance.image_span(s.tokens, vocab) for s in samples]
  own, donor = next((a, b) for i, a in enumerate(samples) for j, b in enumerate(samples)
                    if i < j and spans[i] == spans[j])
  span = image_reliance.image_span(own.tokens, vocab)
  assert span.stop - span.start == 64
  swapped = image_reliance.with_image_of(own, donor, vocab)
  np.testing.assert_array_equal(swapped[span], donor.tokens[span])
  outside = np.ones(len(own.tokens), bool)
  outside[span] = False
  np.testing.assert_array_equal(swapped[outside], own.tokens[outside])
  assert (swapped[span] != own.tokens[span]).any()


class Oracle:
  """Knows every sample's response: at column j - 1 it puts all its mass on the token at j,
  when `reads_image` only if the input's image is that sample's own (else uniform). Without
  reading, it tells the fixture's samples apart by their lengths."""

  def __init__(self, samples, vocab, reads_image):
    self.samples, self.vocab, self.reads_image = samples, vocab, reads_image

  def __call__(self, inputs, segment_ids):
    inputs = np.asarray(inputs[0])
    span = image_reliance.image_span(inputs, self.vocab)
    # The prompt is never masked, so it tells which sample this is (images differ by scene).
    sample = next((s for s in self.samples if len(s.tokens) == len(inputs)
                   and (not self.reads_image or (s.tokens[span] == inputs[span]).all())), None)
    logits = np.zeros((len(inputs), self.vocab.size), np.float32)
    if sample is not None:
      logits[np.arange(len(inputs) - 1), sample.tokens[1:]] = 30.0
    return jnp.asarray(logits)[None]


def test_a_model_that_reads_the_image_loses_its_answers_when_the_image_is_swapped(world):
  vocab, samples = world
  reads = image_reliance.reliance(Oracle(samples, vocab, True), vocab, samples, 1.0)
  assert reads["samples"] >= 2
  assert reads["accuracy_own"] == 1.0 and reads["nll_own"] < 1e-6
  assert reads["accuracy_gap"] > 0.5 and reads["nll_gap"] > 1.0
  blind = image_reliance.reliance(Oracle(samples, vocab, False), vocab, samples, 0.5)
  assert blind["accuracy_own"] == blind["accuracy_swapped"] == 1.0
  assert blind["nll_gap"] == pytest.approx(0.0, abs=1e-6)
