"""The speech encoder's front end, on the host in numpy: a 16 kHz waveform -> 80-bin kaldi fbank
(25 ms hamming frames every 10 ms, no dither, samples scaled to 16-bit range) -> low frame rate
stacking (7 frames every 6) -> CMVN from the model's am.mvn. It computes exactly what FunASR's
WavFrontend computes for SenseVoice.

The fbank is kaldi-native-fbank itself rather than a JAX port: it is FunASR's own fbank here
(torchaudio, its first choice, does not load against this torch), so parity holds by
construction; it is C++ at ~600x real time per core on this machine, so the host CPUs that feed a
pod keep up without taking the accelerators' time; and features are variable-length per
utterance, which suits the data pipeline's workers (whose output is fixed-shape batches), not a
jitted step. A JAX port would have to match kaldi's mel banks, povey/hamming windows, pre-emphasis
and the FFT-size rounding to 1e-4 under TPU matmul precision, for no gain in what reaches the
encoder. LFR stacking and CMVN are a gather and an affine map.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import kaldi_native_fbank as knf
import numpy as np

from omnijax.config import SpeechEncoderConfig

# Kaldi computes on samples in 16-bit range; FunASR scales float waveforms by this.
SAMPLE_SCALE = 32768.0
# The CMVN statistics' file name, FunASR's: beside a checkpoint's tensors and in an omnijax model
# directory.
CMVN_FILE = "am.mvn"


class FrontendError(ValueError):
  """A waveform or an am.mvn file that the front end cannot use; the message names it."""


def _window_samples(config: SpeechEncoderConfig, ms: float) -> int:
  return int(config.sample_rate * 0.001 * ms)


def fbank(waveform: np.ndarray, config: SpeechEncoderConfig) -> np.ndarray:
  """[samples] float waveform in [-1, 1] at config.sample_rate -> [frames, num_mel_bins] float32
  log-mel energies (kaldi fbank, snip_edges: only whole frames)."""
  waveform = np.asarray(waveform, dtype=np.float32)
  if waveform.ndim != 1:
    raise FrontendError(f"expected a mono waveform, got shape {waveform.shape}")
  # FunASR shortens the frame of a shorter clip, and fails below 256 samples; no speech is that
  # short, so such clips are refused.
  if waveform.size < _window_samples(config, config.frame_length_ms):
    raise FrontendError(f"{waveform.size} samples are shorter than one {config.frame_length_ms:g} "
                        f"ms frame at {config.sample_rate} Hz")
  options = knf.FbankOptions()
  frame = options.frame_opts
  frame.samp_freq = float(config.sample_rate)
  frame.frame_length_ms = config.frame_length_ms
  frame.frame_shift_ms = config.frame_shift_ms
  frame.window_type = config.window
  frame.dither = 0.0
  frame.snip_edges = True
  options.mel_opts.num_bins = config.num_mel_bins
  options.energy_floor = 0.0
  computer = knf.OnlineFbank(options)
  computer.accept_waveform(float(config.sample_rate), waveform * SAMPLE_SCALE)
  computer.input_finished()
  return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])


def stack_low_frame_rate(frames: np.ndarray, m: int, n: int) -> np.ndarray:
  """[T, bins] -> [ceil(T / n), m * bins]: output i concatenates frames i*n - (m-1)//2 ...
  i*n + m - 1 - (m-1)//2, the first frame repeated before the start and the last after the end
  (FunASR's apply_lfr)."""
  count = math.ceil(frames.shape[0] / n)
  index = np.arange(count)[:, None] * n + np.arange(m)[None, :] - (m - 1) // 2
  index = np.clip(index, 0, frames.shape[0] - 1)
  return frames[index].reshape(count, m * frames.shape[1])


@dataclasses.dataclass(frozen=True)
class Cmvn:
  """Global CMVN as the model's am.mvn stores it: features -> (features + shift) * scale."""

  shift: np.ndarray
  scale: np.ndarray

  def apply(self, features: np.ndarray) -> np.ndarray:
    return ((features + self.shift) * self.scale).astype(np.float32)

  @classmethod
  def fit(cls, features: np.ndarray) -> Cmvn:
    """The statistics that take `features` [frames, size] to zero mean and unit variance per
    dimension (a model trained from scratch, such as the toy world's, has no am.mvn of its own)."""
    mean = features.mean(axis=0, dtype=np.float64)
    std = np.maximum(features.std(axis=0, dtype=np.float64), 1e-5)
    return cls(shift=(-mean).astype(np.float32), scale=(1.0 / std).astype(np.float32))


def write_cmvn(path: str | os.PathLike, cmvn: Cmvn) -> None:
  """Writes `cmvn` as the Kaldi nnet text am.mvn SenseVoiceSmall ships (what `read_cmvn` reads)."""
  vector = lambda v: " ".join(f"{x:.9g}" for x in v)
  size = len(cmvn.shift)
  pathlib.Path(path).write_text(
      f"<Nnet>\n<Splice> {size} {size}\n[ 0 ]\n"
      f"<AddShift> {size} {size}\n<LearnRateCoef> 0 [ {vector(cmvn.shift)} ]\n"
      f"<Rescale> {size} {size}\n<LearnRateCoef> 0 [ {vector(cmvn.scale)} ]\n</Nnet>\n")


def read_cmvn(path: str | os.PathLike, feature_size: int) -> Cmvn:
  """Reads a Kaldi nnet text am.mvn: the vectors after `<AddShift>` and `<Rescale>` (each on the
  next line, `<LearnRateCoef> 0 [ v1 ... vN ]`)."""
  try:
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise FrontendError(f"{path}: cannot read the CMVN statistics: {e}") from None
  vectors = {}
  for component, following in zip(lines, lines[1:]):
    words, values = component.split(), following.split()
    if words[:1] in (["<AddShift>"], ["<Rescale>"]) and values[:1] == ["<LearnRateCoef>"]:
      try:
        vectors[words[0]] = np.array(values[3:-1], dtype=np.float32)
      except ValueError:
        raise FrontendError(f"{path}: the {words[0]} vector is not numeric") from None
  for component in ("<AddShift>", "<Rescale>"):
    if component not in vectors:
      raise FrontendError(f"{path}: no {component} vector; not a Kaldi nnet am.mvn")
    if vectors[component].shape != (feature_size,):
      raise FrontendError(f"{path}: the {component} vector has {vectors[component].size} values, "
                          f"the encoder's features {feature_size}")
  return Cmvn(shift=vectors["<AddShift>"], scale=vectors["<Rescale>"])


def stacked_fbank(waveform: np.ndarray, config: SpeechEncoderConfig) -> np.ndarray:
  """A float waveform -> fbank stacked to the encoder's frames, before CMVN."""
  return stack_low_frame_rate(fbank(waveform, config), config.lfr_m, config.lfr_n)


def speech_features(waveform: np.ndarray, config: SpeechEncoderConfig, cmvn: Cmvn) -> np.ndarray:
  """A float waveform at config.sample_rate -> the encoder's input [frames, feature_size]."""
  return cmvn.apply(stacked_fbank(waveform, config))


def feature_frames(num_samples: int, config: SpeechEncoderConfig) -> int:
  """How many encoder input frames `speech_features` gives for `num_samples` samples, without
  computing them (for sizing sequences before reading audio); 0 for a clip it refuses."""
  window = _window_samples(config, config.frame_length_ms)
  if num_samples < window:
    return 0
  fbank_frames = 1 + (num_samples - window) // _window_samples(config, config.frame_shift_ms)
  return math.ceil(fbank_frames / config.lfr_n)
