"""The speech front end (waveform -> fbank -> LFR -> CMVN) against FunASR's WavFrontend, and its
error paths."""

import numpy as np
import pytest

from omnijax.config import SpeechEncoderConfig
from omnijax.data.speech_frontend import (FrontendError, fbank, feature_frames, read_cmvn,
                                           speech_features, stack_low_frame_rate)

RELEASE = SpeechEncoderConfig()


@pytest.fixture(scope="module")
def cmvn_file(tmp_path_factory, write_am_mvn):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("cmvn") / "am.mvn"
  write_am_mvn(path, rng.normal(size=560).astype(np.float32),
               rng.uniform(0.2, 2.0, size=560).astype(np.float32))
  return path


# One frame exactly, one sample over, the LFR boundaries, seconds of audio.
@pytest.mark.parametrize("samples", [400, 401, 1200, 1360, 16000, 23999, 48000])
def test_features_equal_funasr_wav_frontend(funasr_frontend, cmvn_file, samples):
  rng = np.random.default_rng(samples)
  waveform = (0.3 * rng.standard_normal(samples)).clip(-1, 1).astype(np.float32)
  frontend = funasr_frontend.wav_frontend.WavFrontend(
      cmvn_file=str(cmvn_file), fs=16000, window="hamming", n_mels=80, frame_length=25,
      frame_shift=10, lfr_m=7, lfr_n=6, dither=0.0)
  torch = funasr_frontend.torch
  expected, expected_lengths = frontend(torch.from_numpy(waveform)[None], torch.tensor([samples]))
  ours = speech_features(waveform, RELEASE, read_cmvn(cmvn_file, 560))
  assert ours.dtype == np.float32 and ours.shape == tuple(expected.shape[1:])
  assert expected_lengths.tolist() == [len(ours)] == [feature_frames(samples, RELEASE)]
  # FunASR's fbank is kaldi-native-fbank where torchaudio does not load (this machine, CI): the
  # same library with the same options, the same gather and affine map give the same bits.
  # torchaudio's kaldi fbank differs from it by ~2.4e-4 on log-mels.
  uses_torchaudio = funasr_frontend.fbank._HAS_TORCHAUDIO
  np.testing.assert_allclose(ours, expected[0].numpy(), rtol=0, atol=1e-3 if uses_torchaudio else 0)


@pytest.mark.parametrize("m,n", [(7, 6), (3, 2), (1, 1)])
def test_low_frame_rate_equals_funasr_apply_lfr(funasr_frontend, m, n):
  torch = funasr_frontend.torch
  for frames in range(1, 40):
    x = torch.randn(frames, 5)
    expected = funasr_frontend.wav_frontend.apply_lfr(x, m, n).numpy()
    np.testing.assert_array_equal(stack_low_frame_rate(x.numpy(), m, n), expected)


def test_fbank_is_log_mel_of_the_16_bit_scaled_waveform():
  """A 1 kHz tone at full scale: energy peaks in the mel bin that holds 1 kHz, and the level
  matches the 16-bit scaling (a [-1, 1] waveform unscaled would be 2 * ln(32768) ~ 20.8 lower)."""
  t = np.arange(16000) / 16000
  frames = fbank(np.sin(2 * np.pi * 1000 * t).astype(np.float32), RELEASE)
  assert frames.shape == (98, 80)
  mel = lambda f: 1127 * np.log(1 + f / 700)
  centres = np.linspace(mel(20), mel(8000), 82)[1:-1]
  assert abs(int(np.argmax(frames[50])) - int(np.argmin(abs(centres - mel(1000))))) <= 1
  quiet = fbank((np.sin(2 * np.pi * 1000 * t) / 32768).astype(np.float32), RELEASE)
  np.testing.assert_allclose(frames[50].max() - quiet[50].max(), 2 * np.log(32768), atol=1e-3)


def test_feature_frames_counts_without_computing():
  for samples in [400, 559, 560, 1359, 1360, 1361, 16000, 16001, 160000]:
    waveform = np.zeros(samples, np.float32)
    features = stack_low_frame_rate(fbank(waveform, RELEASE), 7, 6)
    assert feature_frames(samples, RELEASE) == len(features), samples
  assert feature_frames(399, RELEASE) == feature_frames(0, RELEASE) == 0


def test_bad_waveforms_are_refused():
  for samples in (0, 399):
    with pytest.raises(FrontendError, match=f"^{samples} samples are shorter than one 25 ms frame "
                       "at 16000 Hz$"):
      fbank(np.zeros(samples, np.float32), RELEASE)
  with pytest.raises(FrontendError, match=r"mono waveform, got shape \(2, 800\)"):
    fbank(np.zeros((2, 800), np.float32), RELEASE)


def test_bad_am_mvn_files_name_the_file_and_the_problem(tmp_path, write_am_mvn):
  missing = tmp_path / "absent.mvn"
  with pytest.raises(FrontendError, match="absent.mvn: cannot read"):
    read_cmvn(missing, 560)
  narrow = tmp_path / "narrow.mvn"
  write_am_mvn(narrow, np.zeros(80), np.ones(80))
  with pytest.raises(FrontendError, match="narrow.mvn: the <AddShift> vector has 80 values, the "
                     "encoder's features 560"):
    read_cmvn(narrow, 560)
  no_scale = tmp_path / "no_scale.mvn"
  no_scale.write_text("<Nnet>\n<AddShift> 2 2\n<LearnRateCoef> 0 [ 1 2 ]\n</Nnet>\n")
  with pytest.raises(FrontendError, match="no_scale.mvn: no <Rescale> vector"):
    read_cmvn(no_scale, 2)
  garbled = tmp_path / "garbled.mvn"
  garbled.write_text("<AddShift> 2 2\n<LearnRateCoef> 0 [ 1 x ]\n"
                     "<Rescale> 2 2\n<LearnRateCoef> 0 [ 1 2 ]\n")
  with pytest.raises(FrontendError, match="garbled.mvn: the <AddShift> vector is not numeric"):
    read_cmvn(garbled, 2)


def test_cmvn_shifts_then_scales(tmp_path):
  path = tmp_path / "two.mvn"
  path.write_text("<AddShift> 2 2\n<LearnRateCoef> 0 [ 1 2 ]\n"
                  "<Rescale> 2 2\n<LearnRateCoef> 0 [ 3 4 ]\n")
  features = read_cmvn(path, 2).apply(np.array([[1.0, 1.0]], np.float32))
  assert features.dtype == np.float32
  np.testing.assert_array_equal(features, [[(1 + 1) * 3, (1 + 2) * 4]])
