"""Golden shardings: the shipped experiments lay their parameters out exactly as checked in, and
a change is caught until `omnijax shardings --update` regenerates the goldens on purpose."""

import json

import jax
import pytest

from omnijax import sharding
from omnijax.podfit import golden

EXPERIMENTS = golden.shipped_experiments()


def test_every_shipped_tpu_experiment_has_a_golden():
  assert len(EXPERIMENTS) >= 5
  assert {path.stem for path in golden.GOLDEN_DIR.glob("*.json")} == set(EXPERIMENTS)


@pytest.mark.libtpu
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_shardings_match_the_golden(name):
  expected = json.loads(golden.golden_path(name).read_text())
  assert golden.differences(expected, golden.sharding_record(EXPERIMENTS[name])) == []


@pytest.mark.libtpu
def test_a_rules_change_fails_until_the_golden_is_regenerated(monkeypatch, tmp_path, capsys):
  name = "omni7b_v5p128"
  record = golden.sharding_record(EXPERIMENTS[name])
  assert record["params"]["lm_head"] == {"shape": [3584, 176264], "spec": ["fsdp", "tensor"],
                                         "per_chip_shape": [224, 44066]}
  monkeypatch.setitem(sharding._RULES, "mlp", None)  # MLP weights no longer tensor-sharded
  assert golden.check_or_update([name], golden.GOLDEN_DIR, update=False) == 1
  out = capsys.readouterr().out
  assert ("layers/mlp/down_proj/kernel: spec [None, 'tensor', 'fsdp'] -> [None, None, 'fsdp'], "
          "per_chip_shape [28, 4736, 224] -> [28, 18944, 224]") in out
  # Regenerating on purpose writes the new layout, which then matches.
  assert golden.check_or_update([name], tmp_path, update=True) == 0
  assert golden.check_or_update([name], tmp_path, update=False) == 0
  written = json.loads(golden.golden_path(name, tmp_path).read_text())
  assert written["params"]["layers/mlp/up_proj/kernel"]["spec"] == [None, "fsdp", None]
  assert golden.check_or_update(["nope"], tmp_path, update=False) == 2


@pytest.mark.parametrize("name", ["omni7b_speech_stage3_v5p-128", "omni7b_speech_stage3_v5e-16"])
def test_speech_goldens_hold_every_encoder_and_projector_parameter(name):
  from flax import nnx

  from omnijax.model.build import abstract_model

  golden_params = json.loads(golden.golden_path(name).read_text())["params"]
  _, abstract = abstract_model(EXPERIMENTS[name].model)
  speech = {sharding.path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(abstract)) if path[0].key in ("speech_encoder", "speech_projector")}
  # 17 per block kind (input, stacked, tp: 2 norms, q/k/v/out, FSMN, FFN), the query table, 2
  # norms; the projector's norm and 2 kernels.
  assert len(speech) == 3 * 17 + 1 + 2 * 2 + 4 and speech <= set(golden_params)
  # The 560-wide input kernels and the query table shard over fsdp (560 = 16 x 35), heads over
  # tensor where there is one.
  tensor = EXPERIMENTS[name].mesh.tensor
  input_kernel = golden_params["speech_encoder/input_block/self_attn/linear_q/kernel"]
  assert input_kernel["per_chip_shape"] == [35, 512 // tensor]
  assert golden_params["speech_encoder/queries"]["spec"] == [None, "fsdp"]
