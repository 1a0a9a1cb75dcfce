"""Audio files -> the speech encoder's input: a mono wav/flac read with soundfile, resampled to
the front end's rate (polyphase, scipy), then fbank + LFR + CMVN (omnijax.data.speech_frontend).

Every refusal is an `AudioError` whose message starts with the file, so a caller only adds
where the file was named (a jsonl record, a command-line option).
"""

from __future__ import annotations

import math
import os

import numpy as np
import scipy.signal
import soundfile

from omnijax.config import SpeechEncoderConfig
from omnijax.data.speech_frontend import Cmvn, FrontendError, feature_frames, speech_features
from omnijax.files import check_regular_file


class AudioError(ValueError):
  """An audio file that cannot become speech input; the message names the file and why."""


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
  """[samples] at `rate` -> [samples * target / rate] at `target` (polyphase, anti-aliased)."""
  if rate == target:
    return waveform
  divisor = math.gcd(rate, target)
  return scipy.signal.resample_poly(waveform, target // divisor, rate // divisor).astype(np.float32)


def read_waveform(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
  """A mono audio file (any format soundfile reads: wav, flac, ...) as float32 [-1, 1] samples
  at `sample_rate`."""
  try:
    check_regular_file(path)  # /dev/zero would be read forever
    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
  except (OSError, RuntimeError, ValueError, soundfile.LibsndfileError) as e:
    raise AudioError(f"{path}: not a readable audio file ({str(e).splitlines()[0]})") from None
  if samples.shape[1] != 1:
    raise AudioError(f"{path}: {samples.shape[1]} channels; speech input must be mono")
  if not samples.shape[0]:
    raise AudioError(f"{path}: no samples (an empty recording)")
  return resample(samples[:, 0], rate, sample_rate)


def audio_features(path: str | os.PathLike, config: SpeechEncoderConfig, cmvn: Cmvn,
                   max_frames: int | None = None) -> np.ndarray:
  """An audio file -> the encoder's input [frames, feature_size]; a clip over `max_frames`
  encoder frames (what a row or sequence holds) is refused before its features are computed."""
  waveform = read_waveform(path, config.sample_rate)
  frames = feature_frames(len(waveform), config)
  if max_frames is not None and frames > max_frames:
    seconds = len(waveform) / config.sample_rate
    raise AudioError(f"{path}: {seconds:.2f} s of audio give {frames} speech frames, more than "
                     f"the {max_frames} that fit")
  try:
    return speech_features(waveform, config, cmvn)
  except FrontendError as e:
    raise AudioError(f"{path}: {e}") from None
