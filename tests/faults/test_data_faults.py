"""Faults in data preparation and inspection: bad jsonl, damaged shards, broken manifests."""

import json

import pytest

from fault_helpers import assert_refused, copy_tree, omnijax, snapshot

CAPTION = {"task": "caption", "image_codes": [[1, 2, 3, 4]],
           "messages": [{"role": "user", "content": "Describe.\n<|image|>"},
                        {"role": "assistant", "content": "a red cube"}]}


def prepare_jsonl(toy_data, out, *inputs):
  return omnijax("prepare", "jsonl", *inputs, "--out", out, "--split", "extra",
                 "--tokenizer", toy_data / "tokenizer.json", "--layout", "compact",
                 "--text-size", 512, "--n-image-codes", 256, "--n-speech-codes", 256,
                 "--understanding-image-codes", 4, "--generated-image-codes", 4)


@pytest.fixture(scope="module")
def prepared(toy_data, tmp_path_factory):
  """A jsonl dataset made by `prepare jsonl` (two records), to be damaged by a second prepare."""
  root = tmp_path_factory.mktemp("jsonl")
  good = root / "good.jsonl"
  good.write_text(json.dumps(CAPTION) + "\n" + json.dumps(CAPTION) + "\n")
  out = root / "dataset"
  result = prepare_jsonl(toy_data, out, good)
  assert result.returncode == 0, result.stderr
  assert "2 records" in result.stdout
  return root, good, out


@pytest.mark.parametrize("fault,line,message", [
    # A failure halfway used to truncate the existing shards and keep the old manifest.
    ("bad record halfway", b'{"task": "caption", "messages": []}', r"bad\.jsonl:3: "),
    ("not JSON", b"{not json", r"bad\.jsonl:3: not valid JSON"),
    ("not UTF-8", b'{"task": "caption \xff\xfe"}',
     r"bad\.jsonl:3: not UTF-8 \(byte 0xff at column 19\)"),
    ("unknown task", json.dumps({**CAPTION, "task": "dance"}).encode(),
     r"bad\.jsonl:3: unknown task 'dance'"),
])
def test_failed_prepare_jsonl_names_the_line_and_keeps_the_existing_dataset(
    prepared, toy_data, fault, line, message):
  root, good, out = prepared
  bad = root / "bad.jsonl"
  # More good records than the dataset holds come first: the writer is halfway when it fails.
  bad.write_bytes((json.dumps(CAPTION) + "\n\n").encode() + line + b"\n")
  before = snapshot(out)
  assert_refused(prepare_jsonl(toy_data, out, good, bad), 1, r"^omnijax prepare jsonl: .*" + message)
  assert snapshot(out) == before, fault
  assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_missing_jsonl_input_and_tokenizer(prepared, toy_data, tmp_path):
  root, good, out = prepared
  before = snapshot(out)
  assert_refused(prepare_jsonl(toy_data, out, good, tmp_path / "nope.jsonl"), 1,
                 r"nope\.jsonl")
  result = omnijax("prepare", "jsonl", good, "--out", out, "--split", "extra",
                   "--tokenizer", tmp_path / "tokenizer.json")
  assert_refused(result, 1, r"tokenizer\.json")
  assert snapshot(out) == before


def test_prepare_toyworld_bad_spec(tmp_path):
  assert_refused(omnijax("prepare", "toyworld", "--out", tmp_path / "w", "--n", 1), 2,
                 r"^omnijax prepare toyworld: n=1: the toy world needs at least 3 scenes")
  assert not (tmp_path / "w").exists()


def _damaged(toy_data, tmp_path, damage):
  data = copy_tree(toy_data, tmp_path / "data")
  shard = sorted((data / "train").glob("t2i-*.array_record"))[0]
  damage(shard)
  return data, shard


@pytest.mark.parametrize("fault,damage,message", [
    ("truncated shard", lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 3]),
     r"t2i-00000\.array_record: record \d+: the shard holds \d+ records, the manifest lists"),
    ("zeroed shard", lambda p: p.write_bytes(b""),
     r"t2i-00000\.array_record: record 0: the shard holds 0 records"),
    ("missing shard", lambda p: p.unlink(), r"t2i-00000\.array_record: record 0: .*missing"),
])
def test_data_inspect_names_the_damaged_shard(toy_data, tmp_path, fault, damage, message):
  data, _ = _damaged(toy_data, tmp_path, damage)
  before = snapshot(data)
  assert_refused(omnijax("data", "inspect", data), 1, r"^omnijax data inspect: .*" + message)
  assert snapshot(data) == before


@pytest.mark.parametrize("fault,manifest,message", [
    ("manifest not JSON", "{oops", r"manifest\.json: not valid JSON"),
    ("manifest of another format", json.dumps({"format_version": 99}),
     r"manifest\.json: format_version 99"),
])
def test_data_inspect_broken_manifest(toy_data, tmp_path, fault, manifest, message):
  data = copy_tree(toy_data, tmp_path / "data")
  (data / "train" / "manifest.json").write_text(manifest)
  assert_refused(omnijax("data", "inspect", data / "train"), 1, message)


def test_data_inspect_not_a_dataset(tmp_path):
  assert_refused(omnijax("data", "inspect", tmp_path), 1, r"no manifest\.json here")
