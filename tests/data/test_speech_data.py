"""Continuous speech in the data: clips templated as placeholders, packed into [K, T, F] rows,
batched by the pipeline; audio files read and resampled; the toy world's waveforms."""

import json

import numpy as np
import pytest
import soundfile

from omnijax.config import DataConfig, SpeechEncoderConfig
from omnijax.data import record, shards
from omnijax.data.audio import AudioError, audio_features, read_waveform
from omnijax.data.jsonl import SpeechInput, prepare_jsonl
from omnijax.data.packing import PackIterDataset, SpeechClips
from omnijax.data.pipeline import Batches
from omnijax.data.speech_frontend import Cmvn, read_cmvn, speech_features, stacked_fbank
from omnijax.data.templates import ChatTemplate, speech_field_specs
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec, build
from omnijax.data.validate import check_sample

import grain

SPEC = ToyWorldSpec(n=30, seed=0, grid=8, speech_input="continuous")


@pytest.fixture(scope="module")
def world():
  return build(SPEC)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("speech") / "toyworld"
  prepare(out, SPEC)
  return out


def clip_sample(task_id, tokens, clips, width=3):
  """A packer element with `clips` (frames each) of features that say where they came from."""
  features = [np.full((frames, width), 100 * task_id + k, np.float32) for k, frames in
              enumerate(clips)]
  fields = {}
  if clips:
    fields = dict(speech_features=np.concatenate(features),
                  speech_lengths=np.asarray(clips, np.int32))
  return dict(tokens=np.arange(tokens, dtype=np.int32), response_start=1, task_id=task_id,
              fields=fields)


def test_packing_puts_each_rows_clips_into_k_by_t_by_f_in_segment_order():
  samples = [clip_sample(1, 10, [4, 2]), clip_sample(2, 10, []), clip_sample(3, 10, [5]),
             clip_sample(4, 10, [1, 1])]  # the last has 2 clips, 1 left in the row: next row
  rows = list(PackIterDataset(grain.MapDataset.source(samples).to_iter_dataset(), seq_len=64,
                              pad_id=0, speech=SpeechClips(clips=3, frames=6, feature_size=3)))
  assert len(rows) == 2
  first, second = rows
  assert first["speech_features"].shape == (3, 6, 3)
  np.testing.assert_array_equal(first["speech_lengths"], [4, 2, 5])
  np.testing.assert_array_equal(first["speech_features"][:, :, 0],
                                [[100, 100, 100, 100, 0, 0], [101, 101, 0, 0, 0, 0],
                                 [300] * 5 + [0]])
  np.testing.assert_array_equal(first["segment_ids"][:30], np.repeat([1, 2, 3], 10))
  np.testing.assert_array_equal(second["speech_lengths"], [1, 1, 0])
  np.testing.assert_array_equal(second["speech_features"][:2, 0, 0], [400, 401])
  with pytest.raises(ValueError, match="a  sample carries 4 speech clips, more than the 3 a row "
                                       r"holds \(data.speech_clips\)"):
    list(PackIterDataset(grain.MapDataset.source([clip_sample(1, 10, [1] * 4)])
                         .to_iter_dataset(), 64, 0, speech=SpeechClips(3, 6, 3)))


def test_pipeline_batches_carry_the_records_clips_and_count_their_placeholders(toy_dir):
  config = DataConfig(dir=str(toy_dir), seq_len=256, global_batch_size=4, speech_clips=4,
                      speech_frames=120, mixture={"asr": 1.0, "s2i": 1.0, "svqa": 1.0})
  batches = Batches(config, SPEC.vocab, process_index=0, process_count=1)
  records = [s for task in ("asr", "s2i", "svqa") for s in _split_samples(toy_dir / "train", task)]
  clips_seen = 0
  for _ in range(3):
    batch = next(batches)
    assert batch["speech_features"].shape == (4, 4, 120, SPEC.frontend.feature_size)
    assert batch["speech_lengths"].shape == (4, 4)
    placeholders = (batch["tokens"] == SPEC.vocab.audio_context_id).sum(axis=1)
    lengths = batch["speech_lengths"]
    np.testing.assert_array_equal(placeholders, np.where(lengths > 0, lengths + 4, 0).sum(1))
    for row in range(4):  # each segment's clips are its record's, in order
      clip = 0
      for segment in range(1, batch["segment_ids"][row].max() + 1):
        tokens = batch["tokens"][row][batch["segment_ids"][row] == segment]
        # its record: the one whose tokens it starts with (tail pads follow)
        sample = next(s for s in records if np.array_equal(tokens[:len(s.tokens)], s.tokens))
        frames = sample.fields["speech_lengths"]
        for start, length in zip(np.cumsum(frames) - frames, frames):
          np.testing.assert_array_equal(batch["speech_features"][row, clip, :length],
                                        sample.fields["speech_features"][start:start + length])
          assert not batch["speech_features"][row, clip, length:].any()
          clip += 1
          clips_seen += 1
  assert clips_seen >= 12


def _split_samples(split_dir, task):
  from omnijax.generate.run import read_samples

  return read_samples(split_dir, task)


def test_a_clip_longer_than_the_rows_frames_is_an_error_naming_the_record(toy_dir):
  config = DataConfig(dir=str(toy_dir), seq_len=256, global_batch_size=2, speech_clips=4,
                      speech_frames=10, mixture={"asr": 1.0})
  with pytest.raises(shards.ShardError, match=r"train/asr-00000\.array_record: record \d+: the "
                     r"record carries a speech clip of \d+ frames, more than the 10 a row's "
                     r"clips hold \(data\.speech_frames\)"):
    next(Batches(config, SPEC.vocab, process_index=0, process_count=1))


def test_templated_clips_validate_and_a_mismatch_is_refused(world):
  sample = next(s for s in world.samples["train"] if s.task == "svqa")
  check_sample(sample, SPEC.vocab, SPEC.image_lengths)  # the question heard, the answer spoken
  assert len(sample.fields["speech_lengths"]) == 1
  assert (sample.response >= SPEC.vocab.speech_offset).any()  # tts-style answer: codes
  wrong = record.Sample(sample.task, sample.tokens, sample.response_start,
                        dict(sample.fields, speech_lengths=sample.fields["speech_lengths"] + 1))
  with pytest.raises(record.RecordError, match="do not split speech_features"):
    check_sample(wrong, SPEC.vocab, SPEC.image_lengths)
  features = sample.fields["speech_features"]
  longer = record.Sample(sample.task, sample.tokens, sample.response_start,
                         dict(speech_features=np.concatenate([features, features[:1]]),
                              speech_lengths=sample.fields["speech_lengths"] + 1))
  with pytest.raises(record.RecordError, match=r"holds \d+ placeholders, its clip of \d+ frames "
                                               r"needs \d+"):
    check_sample(longer, SPEC.vocab, SPEC.image_lengths)


def test_a_resampled_8khz_sine_keeps_its_frequency(tmp_path):
  rate, hz = 8000, 440.0
  soundfile.write(tmp_path / "sine.wav", 0.5 * np.sin(2 * np.pi * hz * np.arange(rate) / rate),
                  rate)
  waveform = read_waveform(tmp_path / "sine.wav", 16000)
  assert len(waveform) == 16000
  spectrum = np.abs(np.fft.rfft(waveform))
  assert np.argmax(spectrum) * 16000 / len(waveform) == pytest.approx(hz, abs=1.0)
  assert np.abs(waveform).max() == pytest.approx(0.5, abs=0.02)


def test_audio_files_become_the_front_ends_features(tmp_path, write_am_mvn):
  config = SpeechEncoderConfig()
  rng = np.random.default_rng(0)
  waveform = (0.1 * rng.standard_normal(24000)).astype(np.float32)
  soundfile.write(tmp_path / "clip.flac", waveform, 16000, subtype="PCM_24")
  write_am_mvn(tmp_path / "am.mvn", rng.normal(size=560).astype(np.float32),
               rng.uniform(0.5, 2, 560).astype(np.float32))
  cmvn = read_cmvn(tmp_path / "am.mvn", 560)
  expected = speech_features(soundfile.read(tmp_path / "clip.flac", dtype="float32")[0], config,
                             cmvn)
  np.testing.assert_array_equal(audio_features(tmp_path / "clip.flac", config, cmvn), expected)
  assert expected.shape == (25, 560)  # 148 fbank frames, LFR every 6
  with pytest.raises(AudioError, match="give 25 speech frames, more than the 24 that fit"):
    audio_features(tmp_path / "clip.flac", config, cmvn, max_frames=24)


def test_prepare_jsonl_templates_audios_as_placeholders_with_their_features(tmp_path, world,
                                                                            write_am_mvn):
  config = SpeechEncoderConfig(num_mel_bins=SPEC.mel_bins)
  cmvn = world.cmvn
  waveform = SPEC.speech.render(SPEC.speech.encode(["red", "circle"], 1, np.random.default_rng(0)),
                                np.random.default_rng(0), 16000)
  soundfile.write(tmp_path / "said.wav", waveform, 16000, subtype="FLOAT")  # exact samples
  (tmp_path / "in.jsonl").write_text(json.dumps(
      {"task": "asr", "audios": ["said.wav"],
       "messages": [{"role": "user", "content": "Convert the speech to text.\n<|audio|>"},
                    {"role": "assistant", "content": "red circle"}]}) + "\n")
  template = ChatTemplate(world.tokenizer, SPEC.vocab, SPEC.image_lengths)
  writer = shards.ShardWriter(tmp_path / "out", SPEC.vocab, SPEC.image_lengths,
                              fields=speech_field_specs(config.feature_size))
  prepare_jsonl([tmp_path / "in.jsonl"], writer, template,
                speech=SpeechInput(config, cmvn, seq_len=256))
  (sample,) = _split_samples(tmp_path / "out", "asr")
  expected = speech_features(waveform, config, cmvn)
  np.testing.assert_array_equal(sample.fields["speech_features"], expected)
  assert (sample.prompt == SPEC.vocab.audio_context_id).sum() == len(expected) + 4


def test_toy_waveforms_are_seeded_and_units_sound_distinct():
  speech, rate = SPEC.speech, 16000
  codes = speech.encode(["red", "circle"], 0, np.random.default_rng(0))
  first = speech.render(codes, np.random.default_rng(5), rate)
  np.testing.assert_array_equal(first, speech.render(codes, np.random.default_rng(5), rate))
  other = speech.render(codes, np.random.default_rng(6), rate)
  assert not np.array_equal(first, other)  # a little variation per utterance
  # One unit held for 8 frames, heard in its middle frame's fbank (less its mean: loudness
  # varies): the nearest of the units' renderings by speaker 0 is the unit itself, for another
  # rendering (its own jitter) by any speaker, far above chance (1 / 64).
  frontend = SPEC.frontend

  def heard(seed, speaker):
    frames = []
    for unit in range(speech.units):
      waveform = speech.render(np.full(8, unit + speaker * speech.units),
                               np.random.default_rng(seed), rate)
      features = stacked_fbank(waveform, frontend)
      middle = features[len(features) // 2].reshape(frontend.lfr_m, -1)[frontend.lfr_m // 2]
      frames.append(middle - middle.mean())
    return np.stack(frames)

  reference = heard(0, 0)
  for seed, speaker in ((1, 0), (2, 3), (3, 1)):
    other = heard(seed, speaker)
    nearest = ((other[:, None] - reference[None]) ** 2).sum(-1).argmin(axis=1)
    assert (nearest == np.arange(speech.units)).mean() >= 0.85, (seed, speaker)
  # The continuous world's speech-in tasks hear clips; its tts answers stay codes.
  world = build(ToyWorldSpec(n=6, seed=0, grid=8, speech_input="continuous"))
  by_task = {s.task: s for s in world.samples["train"]}
  assert by_task["tts"].fields == {}
  assert all("speech_features" in by_task[task].fields for task in ("asr", "s2i", "svqa"))
  discrete = build(ToyWorldSpec(n=6, seed=0, grid=8))
  assert all(not s.fields for s in discrete.samples["train"])
