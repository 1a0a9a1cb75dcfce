"""Configs: YAML with includes and overrides, validated into dataclasses with named errors."""

import pytest

from omnijax.config import CONFIG_ROOT, ConfigError, load_config
from omnijax.sharding import make_mesh
from omnijax.config import MeshConfig


@pytest.mark.parametrize("name,params", [("tiny", None), ("toy", (1e6, 2e6)),
                                         ("1b", (1e9, 2e9)), ("omni7b", (7.78e9, 7.80e9))])
def test_model_presets_load(name, params):
  model = load_config(CONFIG_ROOT / "model" / f"{name}.yaml").model
  assert model.name == name
  if params:
    assert params[0] <= model.param_count() <= params[1]


def test_omni7b_has_the_release_dimensions():
  m = load_config(CONFIG_ROOT / "model" / "omni7b.yaml").model
  assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.mlp_size) == (
      28, 3584, 28, 4, 18944)
  assert (m.rope_theta, m.rms_eps, m.vocab_size, m.tie_embeddings) == (1e6, 1e-6, 176264, False)
  assert m.resolved_head_dim == 128


def test_includes_and_overrides_merge_in_order(tmp_path):
  (tmp_path / "base.yaml").write_text("model: {num_layers: 3, hidden_size: 64}\n")
  (tmp_path / "exp.yaml").write_text("defaults: [base.yaml, topology/cpu8.yaml]\n"
                                     "model: {num_layers: 5}\n")
  config = load_config(tmp_path / "exp.yaml", ["model.hidden_size=128", "mesh.tensor=2"])
  assert (config.model.num_layers, config.model.hidden_size) == (5, 128)
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (2, -1, 2)


@pytest.mark.parametrize("overrides,message", [
    (["model.num_heads=6", "model.num_kv_heads=4"], "model.num_heads=6 is not divisible by "
                                                    "model.num_kv_heads=4"),
    (["model.hidden_sise=3"], "unknown config key model.hidden_sise"),
    (["model.num_layers=two"], "model.num_layers: expected an integer"),
    (["model.remat=sometimes"], "model.remat='sometimes'"),
    (["model.attention=magic"], "model.attention='magic'"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis may be -1"),
    (["model.vocab.layout=big"], "model.vocab.layout='big'"),
    (["data.tail_pads_min=9", "data.tail_pads_max=2"], "data.tail_pads_min=9"),
    (["data.speech_frames=0"], "data.speech_clips=1 and data.speech_frames=0 must be >= 1"),
    # Seeds numpy, Grain or jax.random.key would refuse mid-run with a bare OverflowError or
    # ValueError after the workdir was made.
    (["train.seed=100000000000000000000000"], "train.seed=100000000000000000000000: expected an "
                                               "integer within .-2.*63, 2.*63.$"),
    (["data.seed=-5"], "data.seed=-5: expected an integer in .0, 613566756."),
    (["data.seed=613566756"], "data.seed=613566756: expected an integer in .0, 613566756."),
    (["toyworld.seed=-1"], "toyworld.seed=-1: expected an integer >= 0"),
    (["model"], "not of the form key=value"),
    (["toyworld.speech_input=spoken"], "toyworld.speech_input='spoken': expected one of"),
    (["toyworld.speech_input=continuous"], "toyworld.speech_input=continuous needs a speech "
                                           "encoder (model.speech_encoder)"),
])
def test_mistakes_name_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    load_config(CONFIG_ROOT / "model" / "tiny.yaml", overrides)


def test_seeds_at_the_edges_of_their_ranges_are_taken():
  config = load_config(CONFIG_ROOT / "model" / "tiny.yaml",
                       ["train.seed=-9223372036854775808", "data.seed=613566755", "toyworld.seed=0"])
  assert (config.train.seed, config.data.seed) == (-2**63, 613566755)


def test_mesh_must_match_the_device_count():
  import jax
  assert len(jax.devices()) == 8
  assert dict(make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2)).shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ConfigError, match="mesh .* needs 12 devices but 8 are available"):
    make_mesh(MeshConfig(data=3, fsdp=2, tensor=2))
  with pytest.raises(ConfigError, match="mesh.fsdp=-1: 8 devices are not divisible"):
    make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))


def test_missing_file_and_bad_yaml(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(tmp_path / "nope.yaml")
  (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(tmp_path / "bad.yaml")


def test_yaml_aliases_are_bounded_and_errors_fit_one_line():
  from omnijax.config import load_yaml

  bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
      f"{b}: &{b} [{', '.join(['*' + a] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
  refused = [(bomb, r"f\.yaml: not valid YAML: aliases expand to more than 100000 values"),
             ("a: &a [*a]\n", r"an alias refers to a node that contains it"),
             ("x: !!python/name:os.system\n", r"could not determine a constructor for the tag "
                                              r"'tag:yaml\.org,2002:python/name:os\.system' "
                                              r"\(line 1, column 4\)$"),
             ("[" * 5000, "nested too deeply"),
             ("a: b: c\n", r"mapping values are not allowed here \(line 1, column 5\)$")]
  for text, message in refused:
    with pytest.raises(ConfigError, match=message) as raised:
      load_yaml(text, "f.yaml")
    assert "\n" not in str(raised.value)
  # Anchors used as configs use them still load.
  assert load_yaml("base: &b {x: 1}\nother: *b\n", "f.yaml") == {"base": {"x": 1},
                                                                "other": {"x": 1}}


def test_quoted_values_are_cut_short():
  from omnijax.messages import QUOTE_LIMIT, quoted

  shown = quoted("x" * 10**6)
  assert len(shown) <= QUOTE_LIMIT and "…" in shown and shown.startswith("'x")
  exponential = ["x"]
  for _ in range(60):  # 2**60 elements if walked: quoting must not walk them
    exponential = [exponential, exponential]
  assert len(quoted(exponential)) <= QUOTE_LIMIT
  assert quoted("short") == "'short'" and len(quoted(10**1000)) < 60
