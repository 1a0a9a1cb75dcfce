"""The vocabulary reproduces the release's ids and derives compact layouts by the same rules."""

import re

import numpy as np
import pytest

from omnijax.vocab import Modality, SPECIAL_TOKENS, Vocab


def test_release_layout_matches_the_published_ids():
  v = Vocab.omni_diffusion()
  assert (v.size, v.mask_id, v.pad_id, v.im_start_id, v.im_end_id) == (
      176264, 151666, 151643, 151644, 151645)
  assert (v.begin_image_id, v.end_image_id, v.begin_audio_id, v.end_audio_id) == (
      151667, 151668, 151684, 151685)
  assert (v.speech_offset, v.n_speech_codes, v.image_offset, v.n_image_codes) == (
      151688, 16384, 168072, 8192)
  assert v.special_id("<|beginoftext|>") == 151665
  assert v.image_placeholder_id == 151682 and v.audio_placeholder_id == 151687
  assert v.audio_context_id == 151686  # reference §2.2: <|context_of_audio|>
  assert len(set(v.special_tokens.values())) == len(SPECIAL_TOKENS)


def test_compact_layout_keeps_the_specials_order_and_offsets():
  release, small = Vocab.omni_diffusion(), Vocab.compact(500, n_image_codes=64, n_speech_codes=32)
  shift = release.text_size - small.text_size
  for token, release_id in release.special_tokens.items():
    assert small.special_id(token) == release_id - shift
  assert small.speech_offset == 500 + 45 and small.image_offset == 500 + 45 + 32
  assert small.size == 500 + 45 + 32 + 64


def test_codes_round_trip_and_modalities():
  v = Vocab.compact(100, n_image_codes=16, n_speech_codes=8)
  speech = v.speech_ids([0, 7, 3])
  image = v.image_ids(np.arange(16))
  np.testing.assert_array_equal(v.speech_codes(speech), [0, 7, 3])
  np.testing.assert_array_equal(v.image_codes(image), np.arange(16))
  ids = np.array([0, 99, v.pad_id, v.mask_id, speech[0], image[-1]])
  np.testing.assert_array_equal(
      v.modality(ids), [Modality.TEXT, Modality.TEXT, Modality.SPECIAL, Modality.SPECIAL,
                        Modality.SPEECH, Modality.IMAGE])
  assert v.modality(int(image[0])) is Modality.IMAGE


def test_out_of_range_inputs_fail_with_the_offending_value():
  v = Vocab.compact(100, n_image_codes=16, n_speech_codes=8)
  with pytest.raises(ValueError, match="speech code 8 at index 1 is outside"):
    v.speech_ids([1, 8])
  with pytest.raises(ValueError, match=r"id 5 at index 0 is not a image id"):
    v.image_codes([5])
  # JSON numbers are checked one by one: numpy would make 2**70 an object and 2**63 a float.
  with pytest.raises(ValueError, match=r"image code 1180591620717411303424 at index 1 is outside"):
    v.image_ids([1, 2**70])
  with pytest.raises(ValueError, match=r"image code 9223372036854775808 at index 1 is outside"):
    v.image_ids([1, 2**63])
  for code in (1.5, True, [1]):
    with pytest.raises(TypeError, match=rf"speech code {re.escape(repr(code))} at index 0 is not "
                                        "an integer"):
      v.speech_ids([code])
  with pytest.raises(ValueError, match=f"token id {v.size} at index 2"):
    v.check_ids([0, 1, v.size])
  with pytest.raises(ValueError, match="text_size must be an integer >= 1"):
    Vocab.compact(0, n_image_codes=16, n_speech_codes=8)
  with pytest.raises(KeyError, match="not a special token"):
    v.special_id("<|nope|>")
