"""Host cost of continuous speech input: audio -> fbank + LFR + CMVN, per second of audio, against
what one TPU v5p host consumes training omni7b (docs/benchmarks.md, "Speech front end").

    python benchmarks/speech_frontend.py [--seconds 10] [--clips 20]

Times, on one core, (a) the front end alone (kaldi-native-fbank, LFR 7/6, CMVN) on in-memory
16 kHz audio and (b) reading a 44.1 kHz flac with soundfile plus polyphase resampling to 16 kHz,
then prints audio seconds per CPU second and the cores one v5p host would need if every token
it trains on were a speech placeholder (the worst case: ~16.7 placeholders per audio second).
Also prints bytes per audio second of each storage choice.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import soundfile

from data_pipeline import required_tokens_per_second
from omnijax.config import SpeechEncoderConfig
from omnijax.data.audio import read_waveform
from omnijax.data.speech_frontend import Cmvn, feature_frames, speech_features


def audio_seconds_per_cpu_second(fn, clips: int, seconds: float) -> float:
  fn()  # warm-up
  start = time.process_time()
  for _ in range(clips):
    fn()
  return clips * seconds / (time.process_time() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
  parser.add_argument("--clips", type=int, default=20)
  args = parser.parse_args()
  config = SpeechEncoderConfig()
  rng = np.random.default_rng(0)
  waveform = (0.1 * rng.standard_normal(int(args.seconds * config.sample_rate))).astype(np.float32)
  cmvn = Cmvn(shift=np.zeros(config.feature_size, np.float32),
              scale=np.ones(config.feature_size, np.float32))
  frontend = audio_seconds_per_cpu_second(lambda: speech_features(waveform, config, cmvn),
                                          args.clips, args.seconds)
  with tempfile.NamedTemporaryFile(suffix=".flac") as flac:
    soundfile.write(flac.name, rng.uniform(-0.1, 0.1, int(args.seconds * 44100)), 44100)
    reading = audio_seconds_per_cpu_second(lambda: read_waveform(flac.name, config.sample_rate),
                                           args.clips, args.seconds)
  both = 1 / (1 / frontend + 1 / reading)
  samples = int(args.seconds * config.sample_rate)
  placeholders = (feature_frames(samples, config) + 4) / args.seconds
  required, _ = required_tokens_per_second()
  audio_demand = required / placeholders
  print(f"front end (fbank+LFR+CMVN): {frontend:,.0f} audio s per CPU s")
  print(f"read flac 44.1 kHz + resample to 16 kHz: {reading:,.0f} audio s per CPU s")
  print(f"together: {both:,.0f} audio s per CPU s")
  print(f"one v5p host's omni7b demand: {required:,.0f} tokens/s; all of them speech "
        f"placeholders ({placeholders:.1f} per audio s): {audio_demand:,.0f} audio s/s -> "
        f"{audio_demand / frontend:.2f} cores for features from audio, "
        f"{audio_demand / both:.2f} from flac files")
  frames = feature_frames(samples, config) / args.seconds
  print(f"storage per audio second: 16 kHz float32 audio {4 * config.sample_rate:,} B, int16 "
        f"{2 * config.sample_rate:,} B; features float32 {4 * frames * config.feature_size:,.0f} B")


if __name__ == "__main__":
  main()
