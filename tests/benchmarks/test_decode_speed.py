"""`benchmarks/decode_speed.py`: its FLOP counts against hand counts, and its report on two tiny
trained runs (the counting and the table's consistency; no timing is asserted)."""

import json
import pathlib
import subprocess
import sys

import pytest

from omnijax.config import CONFIG_ROOT, load_config
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec
from omnijax.generate.run import read_samples

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import decode_speed  # noqa: E402

TINY_EXPERIMENT = REPO / "tests" / "train" / "tiny_experiment.yaml"


def tiny_model():
  config = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
          config.mlp_size, config.vocab_size) == (2, 64, 4, 2, 128, 1152)
  return config


def per_query(keys):
  """The tiny model's forward FLOPs per query by hand: matmul parameters per layer 64 x 64 (q)
  + 2 x 64 x 32 (k, v) + 64 x 64 (o) + 3 x 64 x 128 (MLP) = 36,864, two layers, plus the
  lm_head 64 x 1,152: 147,456, two FLOPs each; attention 4 x 2 layers x keys x 4 heads x 16."""
  return 2 * 147_456 + 512 * keys


def test_forward_flops_are_the_hand_count():
  assert decode_speed.forward_flops(tiny_model(), 3, 10) == 3 * per_query(10) == 900_096


def test_sample_flops_count_what_each_decoder_runs():
  config = tiny_model()
  ar, diffusion = decode_speed.Setup("ar"), decode_speed.Setup("diffusion")
  # AR: a 6-token prompt's prefill gives the first token; two more, one query each against the
  # prompt and the tokens before.
  assert decode_speed.sample_flops(config, ar, [6], 8, 3, None, 8) == (
      6 * per_query(6) + per_query(7) + per_query(8))
  # Uncached diffusion: every pass runs the 6 + 4 columns.
  assert decode_speed.sample_flops(config, diffusion, [6], 4, 3, 3, 4) == 3 * 10 * per_query(10)
  # Dual cache: 2 refreshes run the whole 6 + 8 columns, the 3 other passes a 4-wide window
  # and the column before it, all against 14 keys.
  dual = decode_speed.Setup("diffusion", cache="dual")
  assert decode_speed.sample_flops(config, dual, [6], 8, 5, 2, 4) == (
      2 * 14 * per_query(14) + 3 * 5 * per_query(14))
  # CFG: the unconditional row (a 2-token prompt) runs every pass too.
  assert decode_speed.sample_flops(config, diffusion, [6, 2], 4, 3, 3, 4) == (
      3 * 10 * per_query(10) + 3 * 6 * per_query(6))


def test_setups_and_their_baselines():
  setups = decode_speed.setups([4], 0.9)
  assert len(setups) == 1 + 2 * 2 * 3 and setups[0].decoder == "ar"
  assert setups[0].baseline() == decode_speed.Setup("diffusion")
  dual = decode_speed.Setup("diffusion", 4, "dual", 0.9)
  assert dual in setups and dual.baseline() == decode_speed.Setup("diffusion", 4, "none", 0.9)
  assert decode_speed.decode_overrides(dual, 32, 0) == dict(
      cache="dual", cache_refresh=0, block_size=32, threshold=0.9, alg="maskgit_plus")
  assert decode_speed.decode_overrides(setups[0], 32, 0) == {}


def omnijax(*args):
  return subprocess.run([sys.executable, "-m", "omnijax.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_the_report_on_two_tiny_runs(tmp_path, capsys):
  data = tmp_path / "data"
  prepare(data, ToyWorldSpec(n=20, seed=0, grid=8))
  for name, objective in (("diffusion", "omni"), ("ar", "ar")):
    done = omnijax("train", "--config", TINY_EXPERIMENT, "--workdir", tmp_path / name,
                   f"data.dir={data}", f"train.objective.kind={objective}",
                   "train.stages.stage1.steps=1", "train.stages.stage2.steps=1",
                   "train.stages.stage3.steps=1")
    assert done.returncode == 0, done.stderr
  out = tmp_path / "speed.json"
  assert decode_speed.main(["--diffusion", str(tmp_path / "diffusion"), "--ar",
                            str(tmp_path / "ar"), "--tasks", "t2i", "--samples", "2", "--steps",
                            "4", "--batch", "2", "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  rows = {(r["decoder"], r["steps"], r["cache"], r["threshold"]): r for r in report["rows"]}
  assert len(rows) == len(report["rows"]) == 13
  for (decoder, steps, cache, threshold), row in rows.items():
    assert 0 <= row["quality"] <= 1 and row["chance"] is not None
    if decoder == "diffusion" and cache == "none":
      assert row["speedup"] == {"1": 1.0, "2": 1.0}  # the baseline against itself
  # Without a threshold the schedule fixes the passes: 68 steps at the default (canvas 68),
  # 5 at 4 steps (blocks of 32, 32 and 4 get 2, 2 and 1). Each cache runs fewer columns.
  prompts = [len(s.prompt) for s in read_samples(data / "heldout", "t2i", 2)]
  for steps, passes in (("default", 68), ("4", 5)):
    none, prefix, dual = (rows["diffusion", steps, cache, None] for cache in
                          ("none", "prefix", "dual"))
    assert none["forward_passes"] == prefix["forward_passes"] == dual["forward_passes"] == passes
    assert none["flops_per_sample"] > prefix["flops_per_sample"] > dual["flops_per_sample"]
  # At the default steps the caches refresh at each of the 3 blocks' first steps.
  expected = [3 * (p + 68) * per_query(p + 68) + 65 * 33 * per_query(p + 68) for p in prompts]
  assert rows["diffusion", "default", "dual", None]["flops_per_sample"] == pytest.approx(
      sum(expected) / 2)
  expected = [3 * (p + 68) * per_query(p + 68) + 65 * 69 * per_query(p + 68) for p in prompts]
  assert rows["diffusion", "default", "prefix", None]["flops_per_sample"] == pytest.approx(
      sum(expected) / 2)
  table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| t2i |")]
  assert len(table) == 13 and table[0].split(" | ")[1] == "ar"
