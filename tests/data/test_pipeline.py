"""The Grain pipeline: packed batch layout, tail pads, mixture, drops, sharding and exact resume,
and typed fields in packed rows."""

import dataclasses
import json
import shutil

import grain

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from omnijax.config import ConfigError, DataConfig
from omnijax.data import record
from omnijax.data.packing import PackedField, PackIterDataset
from omnijax.data.pipeline import BATCH_FIELDS, Batches, build_dataset
from omnijax.data.record import FieldSpec, RecordError
from omnijax.data.shards import ManifestError, load_manifest, shard_paths
from omnijax.data.tasks import TASKS
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec
from omnijax.vocab import Vocab

SPEC = ToyWorldSpec(n=24, seed=0, grid=8)
VOCAB = SPEC.vocab


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy")
  prepare(out, SPEC)
  return out


def config(data_dir, **overrides):
  values = dict(dir=str(data_dir), seq_len=384, global_batch_size=8, tail_pads_min=1,
                tail_pads_max=6, seed=5)
  return DataConfig(**{**values, **overrides})


def all_samples(data_dir):
  manifest = load_manifest(data_dir / "train")
  from array_record.python.array_record_module import ArrayRecordReader
  out = {}
  for task in manifest["tasks"]:
    for path in shard_paths(data_dir / "train", manifest, task):
      reader = ArrayRecordReader(path)
      out[task] = [record.decode(p) for p in reader.read(list(range(reader.num_records())))]
  return out


def take(batches, n):
  return [next(batches) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for name in BATCH_FIELDS:
      np.testing.assert_array_equal(np.asarray(x[name]), np.asarray(y[name]))


def test_packed_rows_hold_whole_samples_with_tail_pads(data_dir):
  cfg = config(data_dir)
  samples = {task: {record.encode(s) for s in task_samples}
             for task, task_samples in all_samples(data_dir).items()}
  seen_pads = set()
  for batch in take(Batches(cfg, VOCAB), 3):
    for row in range(cfg.global_batch_size):
      segments = batch["segment_ids"][row]
      count = segments.max()
      assert count >= 1 and list(np.unique(segments[segments > 0])) == list(range(1, count + 1))
      padding = segments == 0
      assert np.all(batch["tokens"][row][padding] == VOCAB.pad_id)
      assert np.all(batch["task_ids"][row][padding] == -1)
      assert not np.any(batch["response_mask"][row][padding])
      for segment in range(1, count + 1):
        where = np.flatnonzero(segments == segment)
        assert np.array_equal(batch["positions"][row][where], np.arange(len(where)))
        tokens = batch["tokens"][row][where]
        response = batch["response_mask"][row][where]
        task = TASKS[batch["task_ids"][row][where[0]]]
        pads = len(tokens) - 1 - np.flatnonzero(tokens != VOCAB.pad_id)[-1]
        seen_pads.add(int(pads))
        assert cfg.tail_pads_min <= pads <= cfg.tail_pads_max
        start = int(np.argmax(response))
        assert np.all(response[start:] == 1) and np.all(response[:start] == 0)
        stored = record.encode(record.Sample(task, tokens[:len(tokens) - pads], start))
        assert stored in samples[task]  # the unpadded row slice is exactly a stored record
  assert len(seen_pads) > 1


def test_a_task_s_own_tail_pad_limit_applies_to_its_samples_only(data_dir):
  cfg = config(data_dir, mixture={"tts": 1.0, "asr": 1.0}, tail_pads_max=2,
               task_tail_pads_max={"tts": 30})
  pads = {"tts": set(), "asr": set()}
  for batch in take(Batches(cfg, VOCAB), 12):
    for row in range(cfg.global_batch_size):
      segments = batch["segment_ids"][row]
      for segment in range(1, segments.max() + 1):
        where = np.flatnonzero(segments == segment)
        tokens = batch["tokens"][row][where]
        task = TASKS[batch["task_ids"][row][where[0]]]
        pads[task].add(int(len(tokens) - 1 - np.flatnonzero(tokens != VOCAB.pad_id)[-1]))
  assert pads["asr"] <= {1, 2} and len(pads["asr"]) == 2
  assert pads["tts"] <= set(range(1, 31)) and max(pads["tts"]) > 2 and len(pads["tts"]) > 5
  with pytest.raises(ConfigError, match="data.task_tail_pads_max.tts=0 must be an integer >= "
                                        "data.tail_pads_min=1"):
    config(data_dir, task_tail_pads_max={"tts": 0})
  with pytest.raises(ConfigError, match="data.task_tail_pads_max.speech: unknown task"):
    config(data_dir, task_tail_pads_max={"speech": 8})


def test_tail_pads_fresh_each_epoch_and_reproducible(data_dir):
  cfg = config(data_dir, mixture={"vqa": 1.0}, seq_len=100, global_batch_size=1,
               tail_pads_max=16)
  records = len(all_samples(data_dir)["vqa"])
  def pads_per_sample(batches):  # vqa rows hold one sample each at seq_len 100
    return [int((b["tokens"][0] == VOCAB.pad_id).sum() - (b["segment_ids"][0] == 0).sum())
            for b in take(batches, 2 * records)]
  first = pads_per_sample(Batches(cfg, VOCAB))
  assert first == pads_per_sample(Batches(cfg, VOCAB))
  epoch0, epoch1 = first[:records], first[records:]
  assert epoch0 != epoch1


def test_mixture_weights_select_tasks(data_dir):
  cfg = config(data_dir, mixture={"asr": 3.0, "tts": 1.0, "t2i": 0.0})
  ids = np.concatenate([b["task_ids"] for b in take(Batches(cfg, VOCAB), 4)], axis=None)
  first_tokens = ids[ids >= 0]
  assert set(np.unique(first_tokens)) == {TASKS.index("asr"), TASKS.index("tts")}
  with pytest.raises(ConfigError, match="data.mixture.speech: unknown task"):
    config(data_dir, mixture={"speech": 1.0})


def test_too_long_samples_are_dropped_and_counted(data_dir):
  cfg = config(data_dir, mixture={"s2i": 1.0}, seq_len=140, global_batch_size=2,
               tail_pads_min=0, tail_pads_max=0)
  lengths = [len(s.tokens) for s in all_samples(data_dir)["s2i"]]
  too_long = sum(n > cfg.seq_len for n in lengths)
  assert 0 < too_long < len(lengths)
  batches = Batches(cfg, VOCAB)
  served = 0
  while served < len(lengths) - too_long:  # one epoch of the samples that fit
    served += int(next(batches)["segment_ids"].max(axis=1).sum())
  assert batches.dropped_samples >= too_long
  assert batches.get_state()["dropped_samples"] == batches.dropped_samples


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_gives_exactly_the_next_batches(data_dir, workers):
  cfg = config(data_dir, num_workers=workers)
  reference = Batches(cfg, VOCAB)
  take(reference, 3)
  state = json.loads(json.dumps(reference.get_state()))
  expected = take(reference, 3)
  reference.close()
  resumed = Batches(cfg, VOCAB)
  resumed.set_state(state)
  assert_same(take(resumed, 3), expected)
  resumed.close()
  if workers:  # one worker reads the same stream as the main process
    assert_same(take(Batches(dataclasses.replace(cfg, num_workers=0), VOCAB), 6)[3:], expected)


def test_global_arrays_sharded_over_data_and_fsdp(data_dir):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
  sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
  batch = next(Batches(config(data_dir), VOCAB, sharding=sharding))
  assert set(batch) == set(BATCH_FIELDS)
  for array in batch.values():
    assert isinstance(array, jax.Array) and array.shape == (8, 384) and array.dtype == np.int32
    assert array.sharding == sharding
    assert {shard.data.shape for shard in array.addressable_shards} == {(1, 384)}


def test_processes_read_disjoint_samples(data_dir):
  """Two processes split the shuffled stream: within an epoch no sample is read twice."""
  cfg = config(data_dir, global_batch_size=4, mixture={"vqa": 1.0}, tail_pads_max=1)
  n_records = load_manifest(data_dir / "train")["tasks"]["vqa"]["records"]
  per_process = n_records // 2
  seen = []
  for index in range(2):
    samples = []
    for batch in build_dataset(cfg, VOCAB, index, 2):
      for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
        for segment in range(1, segments.max() + 1):
          samples.append(tuple(tokens[segments == segment][:-1]))  # minus its one tail pad
      if len(samples) >= per_process:
        break
    seen.append(set(samples[:per_process]))
    assert len(seen[-1]) == per_process  # no repeats within a process either
  assert not seen[0] & seen[1]
  known = {tuple(s.tokens) for s in all_samples(data_dir)["vqa"]}
  assert seen[0] | seen[1] <= known


def test_vocabulary_mismatch_is_a_clear_error(data_dir):
  with pytest.raises(ManifestError, match="text_size: shards 512 vs model 1024"):
    Batches(config(data_dir), Vocab.compact(1024, n_image_codes=256, n_speech_codes=256))


FRAMES = PackedField(FieldSpec("float32", (None, 3)), capacity=6)


def _element(n_tokens, frames, first_token):
  """A loaded sample of `n_tokens` ids (from `first_token` on) with `frames` feature rows
  (None: no field) whose values identify the sample."""
  element = dict(tokens=np.arange(first_token, first_token + n_tokens, dtype=np.int32),
                 response_start=1, task_id=0)
  if frames is not None:
    element["fields"] = {"speech": np.full((frames, 3), first_token, np.float32)
                                   + np.arange(frames, dtype=np.float32)[:, None]}
  return element


def _pack(elements, fields):
  rows = PackIterDataset(grain.MapDataset.source(elements).to_iter_dataset(), 16, 0, fields)
  return list(rows)


def test_packed_rows_keep_each_feature_array_with_its_segment():
  # (tokens, frames): the 4th fits the first row's tokens (15 <= 16) but not its 6 frames; the
  # 5th has more frames than a row holds and is dropped.
  elements = [_element(n, frames, 100 * i) for i, (n, frames) in enumerate(
      [(5, 2), (4, None), (4, 3), (2, 2), (3, 7), (3, 1)])]
  rows = _pack(elements, {"speech": FRAMES})
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]["speech_segment_ids"], [1, 1, 3, 3, 3, 0])
  np.testing.assert_array_equal(rows[1]["speech_segment_ids"], [1, 1, 2, 0, 0, 0])
  assert [int(row["dropped"]) for row in rows] == [0, 1]
  for row in rows:
    assert row["speech"].shape == (6, 3) and row["speech"].dtype == np.float32
    assert not row["speech"][row["speech_segment_ids"] == 0].any()
    for segment in range(1, row["segment_ids"].max() + 1):
      tokens = row["tokens"][row["segment_ids"] == segment]
      source = next(e for e in elements if e["tokens"][0] == tokens[0])
      frames = row["speech"][row["speech_segment_ids"] == segment]
      expected = source.get("fields", {}).get("speech", np.zeros((0, 3), np.float32))
      np.testing.assert_array_equal(frames, expected)  # the segment's own features, in order


def test_packing_refuses_undeclared_or_malformed_fields():
  with pytest.raises(ValueError, match=r"a sample carries field 'speech', which these packed rows "
                     r"do not hold \(declared: none\)"):
    _pack([_element(4, 2, 0)], {})
  wide = _element(4, 2, 0)
  wide["fields"]["speech"] = np.zeros((2, 5), np.float32)
  with pytest.raises(RecordError, match=r"field 'speech': shape \(2, 5\), expected \(\*, 3\)"):
    _pack([wide], {"speech": FRAMES})
  with pytest.raises(ValueError, match="may vary in its first axis only"):
    PackedField(FieldSpec("float32", (None, None)), capacity=4)
  # Rows without declared fields are exactly as before: no extra arrays.
  assert set(_pack([_element(4, None, 0)], {})[0]) == set(BATCH_FIELDS) | {"dropped"}


def test_training_refuses_shards_with_typed_fields_it_does_not_read(data_dir, tmp_path):
  # Continuous speech is read (tests/data/test_speech_data.py); any other field is refused.
  copy = tmp_path / "toy"
  shutil.copytree(data_dir / "train", copy / "train")
  manifest_path = copy / "train" / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest.update(format_version=2, fields={"pitch": {"dtype": "float32", "shape": [None]},
                                            "speech_features": {"dtype": "float32",
                                                                "shape": [None, 560]}})
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(ManifestError, match=r"train/manifest\.json: the records carry typed fields "
                     r"\(pitch\) that training does not read"):
    build_dataset(config(copy), VOCAB)
