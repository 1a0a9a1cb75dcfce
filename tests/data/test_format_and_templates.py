"""Record encoding (typed fields included), ChatML layouts token by token, jsonl conversion and
shard inspection."""

import argparse
import dataclasses
import json
import zlib

import numpy as np
import pytest

from omnijax.data import cli, record, tasks
from omnijax.data.inspect import ShardError, inspect_split
from omnijax.data.jsonl import JsonlError, prepare_jsonl
from omnijax.data.record import FieldSpec, RecordError, Sample
from omnijax.data.shards import ManifestError, ShardWriter, load_manifest
from omnijax.data.templates import ChatTemplate, ImageLengths, TemplateError
from omnijax.data.toyworld.tokenizer import train_bpe
from omnijax.vocab import Vocab

VOCAB = Vocab.compact(300, n_image_codes=64, n_speech_codes=32)
LENGTHS = ImageLengths(understanding=6, generated=4)


@pytest.fixture(scope="module")
def template():
  corpus = [tasks.T2I_PROMPT, tasks.ASR_PROMPT, tasks.SVQA_SYSTEM, "a red cube", "yes"]
  return ChatTemplate(train_bpe(corpus, VOCAB), VOCAB, LENGTHS)


def text(template, s):
  return template.tokenizer.encode(s, add_special_tokens=False).ids


def test_record_round_trip_and_corruption():
  sample = Sample("vqa", np.arange(10, dtype=np.int32), 7)
  payload = record.encode(sample)
  assert record.decode(payload) == sample
  flipped = bytearray(payload)
  flipped[-1] ^= 1
  with pytest.raises(RecordError, match="checksum"):
    record.decode(bytes(flipped))
  with pytest.raises(RecordError, match="header says 10 ids"):
    record.decode(payload[:-4])
  with pytest.raises(RecordError, match="format version 9"):
    record.decode(payload[:2] + bytes([9]) + payload[3:])


def test_t2i_layout_exact(template):
  v = VOCAB
  codes = [1, 2, 3, 4]
  sample = template.encode("t2i", [
      {"role": "user", "content": f"{tasks.T2I_PROMPT}\na red cube"},
      {"role": "assistant", "content": "<|image|>"}], image_codes=[codes])
  nl = text(template, "\n")
  prompt = ([v.im_start_id] + text(template, "user") + nl
            + text(template, f"{tasks.T2I_PROMPT}\na red cube") + [v.im_end_id] + nl
            + [v.im_start_id] + text(template, "assistant") + nl)
  response = [v.begin_image_id, *(v.image_offset + c for c in codes), v.end_image_id,
              v.im_end_id] + nl
  assert sample.tokens.tolist() == prompt + response
  assert sample.response_start == len(prompt)


def test_svqa_speech_in_both_turns(template):
  v = VOCAB
  question, answer, image = [5, 5, 6], [7, 8], list(range(6))
  sample = template.encode("svqa", [
      {"role": "system", "content": tasks.SVQA_SYSTEM},
      {"role": "user", "content": "<|audio|>\n<|image|>"},
      {"role": "assistant", "content": "yes\n<|audio|>"}],
      image_codes=[image], speech_codes=[question, answer])
  nl = text(template, "\n")
  speech = lambda codes: [v.begin_audio_id, *(v.speech_offset + c for c in codes), v.end_audio_id]
  expected = ([v.im_start_id] + text(template, "system") + nl + text(template, tasks.SVQA_SYSTEM)
              + [v.im_end_id] + nl + [v.im_start_id] + text(template, "user") + nl
              + speech(question) + nl + [v.begin_image_id, *(v.image_offset + c for c in image),
                                         v.end_image_id] + [v.im_end_id] + nl
              + [v.im_start_id] + text(template, "assistant") + nl)
  assert sample.tokens[:sample.response_start].tolist() == expected
  assert sample.response.tolist() == (text(template, "yes") + text(template, "\n") + speech(answer)
                                      + [v.im_end_id] + nl)


@pytest.mark.parametrize("messages, images, speech, error", [
    ([{"role": "user", "content": "<|image|>"}, {"role": "assistant", "content": "x"}],
     [[1, 2]], [], "image has 2 codes, expected 6"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
     [], [[1]], "not consumed"),
    ([{"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": "x"}],
     [], [[40]], r"speech code 40 at index 0 is outside \[0, 32\)"),
    ([{"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": "x"}],
     [], [], "special token <\\|im_end\\|>"),
    ([{"role": "user", "content": "hi"}], [], [], "end with an assistant turn"),
])
def test_template_errors(template, messages, images, speech, error):
  with pytest.raises(TemplateError, match=error):
    template.encode("vqa", messages, images, speech)


def _jsonl_line(**item):
  return json.dumps(item) + "\n"


def test_jsonl_prepare_infers_tasks_and_names_bad_line(template, tmp_path):
  good = _jsonl_line(messages=[{"role": "user", "content": f"{tasks.ASR_PROMPT}\n<|audio|>"},
                               {"role": "assistant", "content": "a red cube"}],
                     speech_codes=[[1, 2, 3]])
  caption = _jsonl_line(task="caption", image_codes=[list(range(6))],
                        messages=[{"role": "user", "content": "Describe.\n<|image|>"},
                                  {"role": "assistant", "content": "a red cube"}])
  path = tmp_path / "ok.jsonl"
  path.write_text(good + "\n" + caption)
  manifest = prepare_jsonl([path], ShardWriter(tmp_path / "out", VOCAB, LENGTHS), template)
  assert {task: stats["records"] for task, stats in manifest["tasks"].items()} == {
      "caption": 1, "asr": 1}
  assert manifest["vocab"] == VOCAB.describe()
  assert inspect_split(tmp_path / "out")["asr"]["records"] == 1

  bad = tmp_path / "bad.jsonl"
  bad.write_text(good + _jsonl_line(messages=[{"role": "user", "content": "<|image|>"},
                                              {"role": "assistant", "content": "x"}],
                                    image_codes=[[1, 2, 3, 4, 5, 999]]))
  with pytest.raises(JsonlError, match=rf"^{bad}:2: message 0: image code 999"):
    prepare_jsonl([bad], ShardWriter(tmp_path / "bad_out", VOCAB, LENGTHS), template)


@pytest.fixture
def shard_dir(template, tmp_path):
  out = tmp_path / "split"
  with ShardWriter(out, VOCAB, LENGTHS, max_shard_bytes=200) as writer:
    for word in ("yes", "a red cube", "yes", "a red cube", "yes"):
      writer.write(template.encode("vqa", [
          {"role": "user", "content": "<|image|>"}, {"role": "assistant", "content": word}],
          [list(range(6))]))
  return out


def test_writer_rotates_shards(shard_dir):
  manifest = json.loads((shard_dir / "manifest.json").read_text())
  assert [shard["file"] for shard in manifest["shards"]] == [
      "vqa-00000.array_record", "vqa-00001.array_record", "vqa-00002.array_record"]
  assert sum(shard["records"] for shard in manifest["shards"]) == 5


def _inspect(path, capsys):
  parser = argparse.ArgumentParser()
  cli.register(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["data", "inspect", str(path)])
  code = args.func(args)
  return code, capsys.readouterr()


def test_inspect_reports_and_detects_corruption(shard_dir, capsys):
  code, out = _inspect(shard_dir, capsys)
  assert code == 0 and "vqa             5" in out.out
  # Corrupt a record's ids inside the second shard, keeping the container valid.
  from array_record.python.array_record_module import ArrayRecordWriter
  from omnijax.data.shards import WRITER_OPTIONS
  manifest = json.loads((shard_dir / "manifest.json").read_text())
  target = shard_dir / manifest["shards"][1]["file"]
  sample = Sample("vqa", np.full(12, VOCAB.image_offset, np.int32), 3)
  writer = ArrayRecordWriter(str(target), WRITER_OPTIONS)
  writer.write(record.encode(Sample("vqa", np.zeros(4, np.int32), 1))[:-2])
  writer.write(record.encode(sample))
  writer.close()
  with pytest.raises(ShardError, match=rf"{target}: record 0: header says"):
    inspect_split(shard_dir)
  code, out = _inspect(shard_dir, capsys)
  assert code == 1 and f"{target}: record 0" in out.err


def test_inspect_detects_truncation(shard_dir, capsys):
  target = shard_dir / "vqa-00000.array_record"
  data = target.read_bytes()
  target.write_bytes(data[:len(data) // 2])
  code, out = _inspect(shard_dir, capsys)
  assert code == 1
  assert f"{target}: record 0: the shard holds 0 records, the manifest lists 2" in out.err


FEATURES = {"frame_features": FieldSpec("float32", (None, 560))}


def _with_fields(sample, **fields):
  return dataclasses.replace(sample, fields=fields)


def test_a_tokens_only_record_keeps_format_version_1_byte_for_byte():
  sample = Sample("vqa", np.arange(10, dtype=np.int32), 7)
  ids = np.arange(10, dtype="<i4").tobytes()
  header = record.HEADER.pack(b"OJ", 1, tasks.TASKS.index("vqa"), 10, 7, zlib.crc32(ids))
  assert record.encode(sample) == header + ids


def test_record_round_trip_with_typed_fields_and_corruption():
  rng = np.random.default_rng(0)
  fields = dict(frame_features=rng.normal(size=(7, 560)).astype(np.float32),
                frame_marks=np.array([3, 0, 9], np.int32), mask=np.ones((2, 2, 2), np.uint8))
  sample = Sample("asr", np.arange(10, dtype=np.int32), 4, fields)
  payload = record.encode(sample)
  assert payload[2] == 2  # format version 2: the fields follow the ids
  decoded = record.decode(payload)
  assert decoded == sample and decoded != Sample("asr", sample.tokens, 4)
  assert {name: a.dtype for name, a in decoded.fields.items()} == {
      name: a.dtype for name, a in fields.items()}
  np.testing.assert_array_equal(decoded.fields["frame_features"], fields["frame_features"])
  flipped = bytearray(payload)
  flipped[-30] ^= 1  # inside the last field's data
  with pytest.raises(RecordError, match="checksum mismatch: the ids or fields are corrupted"):
    record.decode(bytes(flipped))
  # A field table that is short or too long, under a valid checksum.
  body = payload[record.HEADER.size:]
  resealed = lambda body: record.HEADER.pack(b"OJ", 2, tasks.TASKS.index("asr"), 10, 4,
                                             zlib.crc32(body)) + body
  with pytest.raises(RecordError, match="asr record: the field table ends inside field 'mask'"):
    record.decode(resealed(body[:-1]))
  with pytest.raises(RecordError, match="asr record: 3 bytes after the last field"):
    record.decode(resealed(body + b"abc"))


@pytest.mark.parametrize("fields,error", [
    (dict(x=np.zeros(3, np.float64)), "field 'x': dtype float64, a record holds"),
    (dict(x=np.float32(1.0)), "field 'x': dtype float32"),  # a numpy scalar, not an array
    (dict(x=np.zeros((), np.float32)), "field 'x': 0 dims, a record holds 1 to 4"),
    ({"not a name": np.zeros(3, np.float32)}, "field name 'not a name' is not an identifier"),
])
def test_sample_refuses_fields_a_record_cannot_hold(fields, error):
  with pytest.raises(RecordError, match=error):
    Sample("asr", np.arange(10, dtype=np.int32), 4, fields)


def _vqa(template, word="yes"):
  return template.encode("vqa", [{"role": "user", "content": "<|image|>"},
                                 {"role": "assistant", "content": word}], [list(range(6))])


def test_writer_declares_fields_and_refuses_the_wrong_ones(template, tmp_path):
  features = np.random.default_rng(1).normal(size=(9, 560)).astype(np.float32)
  with ShardWriter(tmp_path / "speech", VOCAB, LENGTHS, fields=FEATURES) as writer:
    writer.write(_with_fields(_vqa(template), frame_features=features))
    writer.write(_vqa(template, "a red cube"))  # a declared field may be left out
    for fields, error in [
        (dict(frame_features=features.astype(np.float16)),
         "field 'frame_features': dtype float16, expected float32"),
        (dict(frame_features=features[:, :80]),
         r"field 'frame_features': shape \(9, 80\), expected \(\*, 560\)"),
        (dict(frame_features=features[None]),
         r"field 'frame_features': shape \(1, 9, 560\), expected \(\*, 560\)"),
        (dict(pitch=features[:, 0]),
         r"field 'pitch' is not declared for these shards \(declared: frame_features\)"),
    ]:
      with pytest.raises(RecordError, match=f"^{error}$"):
        writer.write(_with_fields(_vqa(template), **fields))
  manifest = load_manifest(tmp_path / "speech")
  assert manifest["format_version"] == 2
  assert manifest["fields"] == {"frame_features": {"dtype": "float32", "shape": [None, 560]}}
  assert inspect_split(tmp_path / "speech")["vqa"]["records"] == 2
  # Without declarations any field is refused, and the manifest stays as before fields.
  with ShardWriter(tmp_path / "plain", VOCAB, LENGTHS) as writer:
    with pytest.raises(RecordError, match=r"declared: none"):
      writer.write(_with_fields(_vqa(template), frame_features=features))
    writer.write(_vqa(template))
  manifest = load_manifest(tmp_path / "plain")
  assert manifest["format_version"] == 1 and "fields" not in manifest


def test_inspect_names_the_file_record_and_field(template, tmp_path, capsys):
  from array_record.python.array_record_module import ArrayRecordWriter
  from omnijax.data.shards import WRITER_OPTIONS
  out = tmp_path / "speech"
  good = _with_fields(_vqa(template), frame_features=np.zeros((4, 560), np.float32))
  with ShardWriter(out, VOCAB, LENGTHS, fields=FEATURES) as writer:
    writer.write(good)
    writer.write(good)
  # Replace the shard: its second record's features have the wrong dtype.
  target = out / "vqa-00000.array_record"
  bad = _with_fields(good, frame_features=np.zeros((4, 560), np.float16))
  shard = ArrayRecordWriter(str(target), WRITER_OPTIONS)
  for sample in (good, bad):
    shard.write(record.encode(sample))
  shard.close()
  code, out_err = _inspect(out, capsys)
  assert code == 1
  assert out_err.err.strip().endswith(f"{target}: record 1: field 'frame_features': dtype "
                                      "float16, expected float32")
  assert len(out_err.err.strip().splitlines()) == 1


def test_manifest_field_declarations_are_checked(template, tmp_path):
  with ShardWriter(tmp_path / "speech", VOCAB, LENGTHS, fields=FEATURES) as writer:
    writer.write(_vqa(template))
  path = tmp_path / "speech" / "manifest.json"
  manifest = json.loads(path.read_text())
  for fields, error in [({"frame_features": {"dtype": "float64", "shape": [None, 560]}},
                         "fields.frame_features: field dtype 'float64' is not one of"),
                        ({"frame_features": [560]}, 'fields.frame_features: expected {"dtype"')]:
    path.write_text(json.dumps({**manifest, "fields": fields}))
    with pytest.raises(ManifestError, match=rf"manifest\.json: {error}"):
      load_manifest(tmp_path / "speech")
