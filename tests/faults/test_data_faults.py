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


# --- continuous speech: the release's "audios" -------------------------------------------------

ASR = {"task": "asr", "audios": ["clip.wav"],
       "messages": [{"role": "user", "content": "Convert the speech to text.\n<|audio|>"},
                    {"role": "assistant", "content": "a red cube"}]}


@pytest.fixture(scope="module")
def speech_prepared(toy_data, tmp_path_factory, write_am_mvn):
  """A dataset of two ASR records with a 1 s mono wav, and the am.mvn it was made with."""
  import numpy as np
  import soundfile

  root = tmp_path_factory.mktemp("audio")
  seconds = np.arange(16000) / 16000
  soundfile.write(root / "clip.wav", 0.3 * np.sin(2 * np.pi * 440 * seconds), 16000)
  rng = np.random.default_rng(0)
  write_am_mvn(root / "am.mvn", rng.normal(size=560).astype(np.float32),
               rng.uniform(0.5, 2, size=560).astype(np.float32))
  good = root / "good.jsonl"
  good.write_text(json.dumps(ASR) + "\n" + json.dumps(ASR) + "\n")
  out = root / "dataset"
  result = prepare_speech(toy_data, root, out, good)
  assert result.returncode == 0, result.stderr
  assert "2 records" in result.stdout
  manifest = json.loads((out / "extra" / "manifest.json").read_text())
  assert manifest["cmvn"] == "am.mvn" and set(manifest["fields"]) == {"speech_features",
                                                                        "speech_lengths"}
  assert (out / "extra" / "am.mvn").read_text() == (root / "am.mvn").read_text()
  return root, good, out


def prepare_speech(toy_data, root, out, *inputs):
  return prepare_jsonl(toy_data, out, *inputs, "--cmvn", root / "am.mvn", "--seq-len", 64)


def _write_bad_audio(root, fault):
  import numpy as np
  import soundfile

  # flac and wav both; an empty flac does not open at all, an empty wav does
  suffix = ".wav" if fault == "empty" else ".flac"
  path = root / f"{fault.replace(' ', '_')}{suffix}"
  if fault == "stereo":
    soundfile.write(path, np.zeros((16000, 2)), 16000)
  elif fault == "empty":
    soundfile.write(path, np.zeros(0), 16000)
  elif fault == "not audio":
    path.write_text("RIFF? no: a text file\n")
  elif fault == "too long":  # 5 s give 83 frames; a 64-token sequence holds 58
    soundfile.write(path, np.zeros(80000), 16000)
  elif fault == "a device":
    path.symlink_to("/dev/zero")
  return path


@pytest.mark.parametrize("fault,message", [
    ("stereo", r"2 channels; speech input must be mono"),
    ("empty", r"no samples \(an empty recording\)"),
    ("not audio", r"not a readable audio file \("),
    ("missing", r"not a readable audio file \("),
    ("a device", r"not a readable audio file \(.*not a regular file"),
    ("too long", r"5\.00 s of audio give 83 speech frames, more than the 58 that fit"),
])
def test_bad_audio_names_the_file_and_record_and_keeps_the_existing_dataset(
    speech_prepared, toy_data, fault, message):
  root, good, out = speech_prepared
  audio = _write_bad_audio(root, fault)
  bad = root / "bad.jsonl"
  bad.write_text(json.dumps(ASR) + "\n\n" + json.dumps({**ASR, "audios": [audio.name]}) + "\n")
  before = snapshot(out)
  line = assert_refused(prepare_speech(toy_data, root, out, good, bad), 1,
                        rf"^omnijax prepare jsonl: {bad}:3: {audio}: {message}")
  assert len(line) < 500
  assert snapshot(out) == before, fault
  assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_audio_without_cmvn_and_a_record_too_long_for_the_sequence(speech_prepared, toy_data):
  root, good, out = speech_prepared
  before = snapshot(out)
  assert_refused(prepare_jsonl(toy_data, out, good), 1,
                 rf"^omnijax prepare jsonl: {good}:1: the record has \"audios\" \(continuous "
                 r"speech\): pass --cmvn")
  # The 1 s clip (16 frames, 22 tokens) fits alone, not with a long answer.
  long = root / "long.jsonl"
  messages = [ASR["messages"][0], {"role": "assistant", "content": "a red cube " * 12}]
  long.write_text(json.dumps({**ASR, "messages": messages}) + "\n")
  assert_refused(prepare_speech(toy_data, root, out, long), 1,
                 rf"^omnijax prepare jsonl: {long}:1: with its audio \(clip\.wav\) the record "
                 r"takes \d+ tokens, more than the sequence length 64 \(--seq-len\)")
  assert snapshot(out) == before
