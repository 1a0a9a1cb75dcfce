"""Faults met by `omnijax generate`: codes of the wrong kind, a damaged or edited workdir config,
a canvas beyond the model, an occupied output. Each is refused in one line naming the file or
option, and neither the workdir nor the results of an earlier run change."""

import json

import numpy as np
import pytest
from PIL import Image

from fault_helpers import ALIAS_BOMB, assert_refused, copy_tree, omnijax, snapshot
from omnijax.files import output_lock

T2I = ("--task", "t2i", "--text", "there is a red circle at the top left")


def generate(workdir, out, *args):
  return omnijax("generate", "--checkpoint", workdir, *args, "--steps", 2, "--out", out)


@pytest.fixture(scope="module")
def earlier(trained_workdir, tmp_path_factory):
  """The output directory of a generate run that succeeded; later faults must leave it alone."""
  out = tmp_path_factory.mktemp("generated") / "out"
  done = generate(trained_workdir, out, *T2I)
  assert done.returncode == 0, done.stderr
  assert (out / "results.jsonl").is_file() and list((out / "images").glob("*.png"))
  return out


def _files(root):
  np.save(root / "float.npy", np.full(64, 3.7))
  np.save(root / "grid.npy", np.zeros((4, 4), np.int32))
  np.save(root / "beyond.npy", np.full(64, 300))
  (root / "huge.json").write_text(json.dumps([2**70] * 64))
  (root / "decimal.txt").write_text("1 2 3.7")
  lines = [{"image_codes": [1.5] * 64}, {"image_codes": [2**70] * 64},
           {"speech_codes": [[1, 2], [3, 4]]}]
  for number, line in enumerate(lines):
    (root / f"request{number}.jsonl").write_text(json.dumps(line) + "\n")
  Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 48 kB, 400 megapixels
  Image.new("RGB", (4096, 4096)).save(root / "large.png")


@pytest.mark.parametrize("fault,args,message", [
    # Used to become code 3: floats were truncated silently.
    ("float codes", ("--task", "caption", "--image-codes", "float.npy"),
     r"--image-codes float\.npy: image codes of dtype float64 and shape \(64,\): expected integer "
     r"codes in \[0, 256\), shape \(64,\) or \(8, 8\)"),
    # Used to be flattened silently.
    ("speech codes of two dimensions", ("--task", "asr", "--speech-codes", "grid.npy"),
     r"--speech-codes grid\.npy: speech codes of shape \(4, 4\): expected integer codes in "
     r"\[0, 256\), 1-D"),
    ("an image of too few codes", ("--task", "caption", "--image-codes", "1,2,3"),
     r"--image-codes 1,2,3: image codes of shape \(3,\): expected .*shape \(64,\) or \(8, 8\)"),
    ("codes beyond the codebook", ("--task", "caption", "--image-codes", "beyond.npy"),
     r"--image-codes beyond\.npy: image code 300 at index 0 is outside \[0, 256\)"),
    ("an integer beyond int64 in JSON", ("--task", "caption", "--image-codes", "huge.json"),
     r"--image-codes huge\.json: image code 1180591620717411303424 at index 0 is outside "
     r"\[0, 256\)"),
    ("a decimal in a text file", ("--task", "asr", "--speech-codes", "decimal.txt"),
     r"--speech-codes 'decimal\.txt': not a list of integer codes \(invalid literal .*'3\.7'\)"),
    ("float codes in --input", ("--task", "caption", "--input", "request0.jsonl"),
     r"request0\.jsonl:1: image codes of dtype float64 and shape \(64,\): expected integer codes"),
    ("an integer beyond int64 in --input", ("--task", "caption", "--input", "request1.jsonl"),
     r"request1\.jsonl:1: image code 1180591620717411303424 at index 0 is outside \[0, 256\)"),
    ("nested speech codes in --input", ("--task", "asr", "--input", "request2.jsonl"),
     r"request2\.jsonl:1: speech codes of shape \(2, 2\): expected .*1-D"),
    ("a decompression bomb", ("--task", "caption", "--image", "bomb.png"),
     r"the command line: bomb\.png: not a readable image \(Image size \(400000000 pixels\) "
     r"exceeds limit"),
    ("an image too large to be the toy world's", ("--task", "caption", "--image", "large.png"),
     r"the command line: large\.png: image is 4096x4096 pixels; the toy world's images have at "
     r"most 512 pixels a side"),
])
def test_inputs_are_refused_unless_of_the_tasks_kind_and_shape(trained_workdir, earlier,
                                                               tmp_path, fault, args, message):
  _files(tmp_path)
  before, outputs = snapshot(trained_workdir), snapshot(earlier)
  result = omnijax("generate", "--checkpoint", trained_workdir, *args, "--steps", 2, "--out",
                   earlier, cwd=tmp_path)
  assert_refused(result, 2, r"^omnijax generate: " + message)
  assert snapshot(trained_workdir) == before and snapshot(earlier) == outputs, fault


def _edited(trained_workdir, tmp_path, edit):
  workdir = copy_tree(trained_workdir, tmp_path / "run")
  config = workdir / "config.yaml"
  config.write_text(edit(config.read_text()))
  return workdir


@pytest.mark.parametrize("fault,edit,message", [
    # Used to be reported as "no readable checkpoint".
    ("an edited model shape", lambda text: text.replace("num_layers: 2", "num_layers: 3"),
     r"config\.yaml does not describe the run's checkpoints \(the checkpoint .*/checkpoints/4 "
     r"holds parameter layers/\S+ as \(2, .*\) float32, the config describes \(3, .*\) float32\)"),
    # Used to end in the catch-all "unexpected error".
    ("a Python tag", lambda text: "x: !!python/object/apply:os.system ['touch executed']\n" + text,
     r"config\.yaml: not valid YAML: could not determine a constructor for the tag "
     r"'tag:yaml\.org,2002:python/object/apply:os\.system' \(line 1, column 4\)"),
    # Used to print an error line of hundreds of megabytes.
    ("an alias bomb", lambda text: ALIAS_BOMB + text,
     r"config\.yaml: not valid YAML: aliases expand to more than 100000 values"),
])
def test_a_damaged_workdir_config_is_named(trained_workdir, earlier, tmp_path, fault, edit,
                                           message):
  workdir = _edited(trained_workdir, tmp_path, edit)
  before, outputs = snapshot(workdir), snapshot(earlier)
  result = generate(workdir, earlier, *T2I)
  line = assert_refused(result, 2, r"^omnijax generate: config error: " + rf"{workdir}/" + message)
  assert len(line) < 500
  assert snapshot(workdir) == before and snapshot(earlier) == outputs, fault
  assert not (tmp_path / "executed").exists()


@pytest.mark.parametrize("fault,args,message", [
    # Used to allocate 330 PB and report it as unexpected.
    ("a canvas beyond the model", ("--canvas", 10**8),
     r"--canvas 100000000: expected 1 to 191 \(the model's sequence length, data\.seq_len=192"),
    ("a canvas the prompt does not leave room for", ("--canvas", 180),
     r"the command line: its prompt of \d+ tokens and --canvas 180 exceed the model's sequence "
     r"length 192"),
    ("a seed beyond int64", ("--seed", 10**30), r"--seed 10{30}: expected an integer within"),
    # Used to print the progress bar before the error.
    ("a top-p beyond 1", ("--top-p", 2), r"top_p=2\.0 must lie in \(0, 1\]"),
])
def test_settings_beyond_what_the_model_takes(trained_workdir, earlier, fault, args, message):
  outputs = snapshot(earlier)
  assert_refused(generate(trained_workdir, earlier, *T2I, *args), 2,
                 r"^omnijax generate: (config error: )?" + message)
  assert snapshot(earlier) == outputs, fault


def test_an_output_in_use_or_in_the_way(trained_workdir, earlier, tmp_path):
  outputs = snapshot(earlier)
  # Another generate writing the same --out (holding its lock) is never replaced.
  with output_lock(earlier / "results.jsonl", "generate"):
    result = generate(trained_workdir, earlier, *T2I)
  assert_refused(result, 1, rf"^omnijax generate: {earlier}/results\.jsonl is being written by "
                            r"another `omnijax generate` \(pid \d+ on .*\); wait for it")
  assert snapshot(earlier) == outputs
  in_the_way = tmp_path / "notes.txt"
  in_the_way.write_text("keep me")
  assert_refused(generate(trained_workdir, in_the_way, *T2I), 2,
                 rf"--out {in_the_way} exists and is not a directory")
  assert in_the_way.read_text() == "keep me"
  (tmp_path / "out" / "results.jsonl").mkdir(parents=True)
  assert_refused(generate(trained_workdir, tmp_path / "out", *T2I), 2,
                 rf"--out {tmp_path}/out: {tmp_path}/out/results\.jsonl is a directory")
