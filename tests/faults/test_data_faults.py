"""Faults in data preparation and inspection: bad jsonl, damaged shards, broken manifests."""

import json
import os

import pytest

from fault_helpers import assert_refused, copy_tree, omnijax, snapshot
from omnijax.files import output_lock

CAPTION = {"task": "caption", "image_codes": [[1, 2, 3, 4]],
           "messages": [{"role": "user", "content": "Describe.\n<|image|>"},
                        {"role": "assistant", "content": "a red cube"}]}


def prepare_jsonl(toy_data, out, *inputs, tokenizer=None):
  return omnijax("prepare", "jsonl", *inputs, "--out", out, "--split", "extra",
                 "--tokenizer", tokenizer or toy_data / "tokenizer.json", "--layout", "compact",
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
    # Used to be described as "dtype object" (beyond int64) or "dtype float64" (beside small
    # codes beyond 2**63).
    ("an integer beyond int64", json.dumps({**CAPTION, "image_codes": [[2**70, 2, 3, 4]]}).encode(),
     r"bad\.jsonl:3: message 0: image code 1180591620717411303424 at index 0 is outside "
     r"\[0, 256\)"),
    ("an integer beyond 2**63", json.dumps({**CAPTION, "image_codes": [[2**63, 2, 3, 4]]}).encode(),
     r"bad\.jsonl:3: message 0: image code 9223372036854775808 at index 0 is outside"),
    ("a decimal code", json.dumps({**CAPTION, "image_codes": [[1.5, 2, 3, 4]]}).encode(),
     r"bad\.jsonl:3: message 0: image code 1\.5 at index 0 is not an integer"),
    ("a nested code list", json.dumps({**CAPTION, "image_codes": [[[1, 2], [3, 4]]]}).encode(),
     r"bad\.jsonl:3: message 0: image has 2 codes, expected 4"),
    ("a huge task name", json.dumps({**CAPTION, "task": "x" * 10**6}).encode(),
     r"bad\.jsonl:3: unknown task 'x+…x+'; known tasks"),
])
def test_failed_prepare_jsonl_names_the_line_and_keeps_the_existing_dataset(
    prepared, toy_data, fault, line, message):
  root, good, out = prepared
  bad = root / "bad.jsonl"
  # More good records than the dataset holds come first: the writer is halfway when it fails.
  bad.write_bytes((json.dumps(CAPTION) + "\n\n").encode() + line + b"\n")
  before = snapshot(out)
  line = assert_refused(prepare_jsonl(toy_data, out, good, bad), 1,
                        r"^omnijax prepare jsonl: .*" + message)
  assert len(line) < 500
  assert snapshot(out) == before, fault
  assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_an_input_without_records_is_refused_unless_an_empty_split_is_asked_for(prepared,
                                                                                toy_data):
  root, good, out = prepared
  before = snapshot(out)
  for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
    (root / name).write_text(text)
    # Used to write an empty dataset and exit 0.
    assert_refused(prepare_jsonl(toy_data, out, good, root / name), 1,
                   rf"^omnijax prepare jsonl: {root / name}: no records \(the file is empty or "
                   r"blank\); pass --allow-empty to write it as an empty split")
    assert snapshot(out) == before, name
  empty = root / "empty_split"
  done = omnijax("prepare", "jsonl", root / "empty.jsonl", "--out", empty, "--split", "extra",
                 "--tokenizer", toy_data / "tokenizer.json", "--allow-empty")
  assert done.returncode == 0, done.stderr
  assert "0 records" in done.stdout
  assert json.loads((empty / "extra" / "manifest.json").read_text())["total"]["records"] == 0


def test_a_second_prepare_into_the_same_split_is_refused(prepared, toy_data):
  root, good, out = prepared
  before = snapshot(out)
  with output_lock(out / "extra", "prepare jsonl"):
    result = prepare_jsonl(toy_data, out, good, good)
  assert_refused(result, 1, rf"^omnijax prepare jsonl: {out}/extra is being written by another "
                            rf"`omnijax prepare jsonl` \(pid {os.getpid()} on ")
  assert snapshot(out) == before


def test_a_tokenizer_that_is_not_a_regular_file(prepared, toy_data):
  root, good, out = prepared
  (root / "tokenizer.json").symlink_to("/dev/zero")
  assert_refused(prepare_jsonl(toy_data, out, good, tokenizer=root / "tokenizer.json"), 1,
                 rf"{root}/tokenizer\.json: not a readable tokenizer\.json \({root}/tokenizer\.json"
                 r": not a regular file \(a character device\)\)")


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
    # Used to be called missing (and a FIFO would have waited for a writer forever).
    ("shard linked to /dev/zero", lambda p: (p.unlink(), p.symlink_to("/dev/zero")),
     r"t2i-00000\.array_record: record 0: not a regular file \(a character device\), not the "
     r"shard the manifest lists"),
    ("a FIFO for a shard", lambda p: (p.unlink(), os.mkfifo(p)),
     r"t2i-00000\.array_record: record 0: not a regular file \(a FIFO\)"),
    ("a directory for a shard", lambda p: (p.unlink(), p.mkdir()),
     r"t2i-00000\.array_record: record 0: not a regular file \(a directory\)"),
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
    ("manifest that is a list", "[1, 2]", r"manifest\.json: expected a JSON object, got list"),
])
def test_data_inspect_broken_manifest(toy_data, tmp_path, fault, manifest, message):
  data = copy_tree(toy_data, tmp_path / "data")
  (data / "train" / "manifest.json").write_text(manifest)
  assert_refused(omnijax("data", "inspect", data / "train"), 1, message)


def test_data_inspect_not_a_dataset(tmp_path):
  assert_refused(omnijax("data", "inspect", tmp_path), 1, r"no manifest\.json here")


def test_data_inspect_manifest_linked_to_dev_zero(toy_data, tmp_path):
  data = copy_tree(toy_data, tmp_path / "data")
  manifest = data / "train" / "manifest.json"
  manifest.unlink()
  manifest.symlink_to("/dev/zero")  # used to be read forever
  assert_refused(omnijax("data", "inspect", data / "train"), 1,
                 rf"{manifest}: not a regular file \(a character device\)")
