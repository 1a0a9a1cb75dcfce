"""Faults in `omnijax convert`: unsupported architectures, broken files, occupied destinations."""

import json

import pytest

from fault_helpers import ALIAS_BOMB, assert_refused, copy_tree, omnijax, snapshot
from omnijax.files import output_lock


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A small Qwen2-layout Hugging Face directory exported by omnijax itself."""
  from omnijax.weights import convert
  from omnijax.config import load_config
  from omnijax.model.build import create_model
  config = load_config(None, ["model.num_layers=1", "model.hidden_size=32",
                              "model.mlp_size=64"]).model
  path = tmp_path_factory.mktemp("hf") / "qwen2"
  convert.to_hf(create_model(config, seed=0), config, path)
  return path


def edited_config(hf_dir, tmp_path, **changes):
  source = copy_tree(hf_dir, tmp_path / "hf")
  config = json.loads((source / "config.json").read_text())
  (source / "config.json").write_text(json.dumps({**config, **changes}))
  return source


@pytest.mark.parametrize("fault,changes,message", [
    ("llama architecture", {"model_type": "llama"}, r"model_type 'llama' is not supported"),
    ("mistral architecture", {"model_type": "mistral"}, r"model_type 'mistral' is not supported"),
    ("sliding window", {"use_sliding_window": True}, r"sliding-window attention is not supported"),
    ("gelu activation", {"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ("scaled RoPE", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
     r"RoPE type 'yarn' is not supported"),
    ("a huge value", {"model_type": "m" * 10**6}, r"model_type 'm+…m+' is not supported"),
])
def test_from_hf_refuses_what_the_backbone_does_not_implement(hf_dir, tmp_path, fault, changes,
                                                               message):
  source = edited_config(hf_dir, tmp_path, **changes)
  line = assert_refused(omnijax("convert", "from-hf", source, tmp_path / "model"), 1,
                        r"^omnijax convert: .*config\.json: " + message)
  assert len(line) < 500
  assert not (tmp_path / "model").exists()


def test_from_hf_broken_files(hf_dir, tmp_path):
  source = copy_tree(hf_dir, tmp_path / "hf")
  (source / "config.json").write_text("{'python': 'dict'}")
  assert_refused(omnijax("convert", "from-hf", source, tmp_path / "a"), 1,
                 r"config\.json: not valid JSON")
  source = copy_tree(hf_dir, tmp_path / "hf2")
  (source / "model.safetensors").write_bytes(b"\x00" * 64)
  assert_refused(omnijax("convert", "from-hf", source, tmp_path / "b"), 1,
                 r"model\.safetensors: not a readable safetensors file")
  (source / "model.safetensors").unlink()
  (source / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
  assert_refused(omnijax("convert", "from-hf", source, tmp_path / "c"), 1,
                 r"only pickle checkpoints found \(pytorch_model\.bin\); they are refused")
  assert_refused(omnijax("convert", "from-hf", tmp_path / "missing", tmp_path / "d"), 1,
                 r"missing: no config\.json")
  assert not any((tmp_path / name).exists() for name in "abcd")


def test_from_hf_refuses_an_existing_model_unless_forced(hf_dir, tmp_path):
  model = tmp_path / "model"
  assert omnijax("convert", "from-hf", hf_dir, model).returncode == 0
  before = snapshot(model)
  assert_refused(omnijax("convert", "from-hf", hf_dir, model), 1,
                 r"model already holds a model; pass --force to replace it")
  assert snapshot(model) == before
  # Someone else's directory is never replaced, --force or not.
  other = tmp_path / "notes"
  other.mkdir()
  (other / "todo.txt").write_text("keep me")
  assert_refused(omnijax("convert", "from-hf", hf_dir, other, "--force"), 1,
                 r"notes is not empty and not an omnijax model directory")
  assert (other / "todo.txt").read_text() == "keep me"
  forced = omnijax("convert", "from-hf", hf_dir, model, "--force")
  assert forced.returncode == 0, forced.stderr
  assert sorted(p.name for p in model.iterdir()) == ["model.yaml", "params"]  # replaced whole
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
  # to-hf into a directory that holds a checkpoint is refused too.
  before = snapshot(hf_dir)
  assert_refused(omnijax("convert", "to-hf", model, hf_dir), 1, r"already holds a checkpoint")
  assert snapshot(hf_dir) == before


@pytest.mark.parametrize("fault,edit,message", [
    ("an alias bomb", lambda text: ALIAS_BOMB + text, r"aliases expand to more than 100000"),
    ("a Python tag", lambda text: "x: !!python/object/apply:os.system ['touch executed']\n" + text,
     r"could not determine a constructor for the tag 'tag:yaml\.org,2002:python/object/apply:"
     r"os\.system'"),
])
def test_to_hf_names_a_damaged_model_yaml(hf_dir, tmp_path, fault, edit, message):
  model = tmp_path / "model"
  assert omnijax("convert", "from-hf", hf_dir, model).returncode == 0
  (model / "model.yaml").write_text(edit((model / "model.yaml").read_text()))
  assert_refused(omnijax("convert", "to-hf", model, tmp_path / "hf", cwd=tmp_path), 2,
                 rf"^omnijax convert: config error: {model}/model\.yaml: not valid YAML: "
                 + message)
  assert not (tmp_path / "hf").exists() and not (tmp_path / "executed").exists()


def test_a_second_convert_into_the_same_destination_is_refused(hf_dir, tmp_path):
  model = tmp_path / "model"
  assert omnijax("convert", "from-hf", hf_dir, model).returncode == 0
  before = snapshot(model)
  with output_lock(model, "convert"):
    result = omnijax("convert", "from-hf", hf_dir, model, "--force")
  assert_refused(result, 1, rf"^omnijax convert: {model} is being written by another `omnijax "
                            r"convert` \(pid \d+ on .*\); wait for it to finish")
  assert snapshot(model) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no lock or staging left
