"""`benchmarks/time_to_quality.py`: its runs and overrides as parsed, the time axis read back from
metrics records, the time to 90 %, the tables; and the whole benchmark on the tiny experiment
(one trained run and the same workdir as an existing one)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.world import ToyWorldSpec

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import time_to_quality as ttq  # noqa: E402

TINY_EXPERIMENT = REPO / "tests" / "train" / "tiny_experiment.yaml"


# --- runs and overrides ---------------------------------------------------------------------


def test_a_run_is_a_name_and_comma_separated_overrides_whose_values_may_hold_commas():
  assert ttq.parse_run("shipped") == ttq.RunSpec("shipped", ())
  rates = ("train.stages.stage1.peak_lr=1e-3", "train.stages.stage2.peak_lr=1e-3")
  assert ttq.parse_run(f"lr1e-3:{rates[0]}, {rates[1]}") == ttq.RunSpec("lr1e-3", rates)
  assert ttq.parse_run("mix:data.mixture={t2i: 1, caption: 1},eval.steps=[4,10],model.qk_norm=true"
                       ).overrides == ("data.mixture={t2i: 1, caption: 1}", "eval.steps=[4,10]",
                                       "model.qk_norm=true")


@pytest.mark.parametrize("text, message", [
    ("a/b", "--run 'a/b': the run name 'a/b' must be letters, digits"),
    (":x=1", "--run ':x=1': the run name '' must be"),
    ("x:lr", "--run 'x:lr': 'lr' is not of the form key=value"),
    ("x:,a=1", "--run 'x:,a=1': '' is not of the form key=value"),
])
def test_a_bad_run_is_refused_naming_what_is_wrong(text, message):
  with pytest.raises(ValueError) as error:
    ttq.parse_run(text)
  assert str(error.value).startswith(message)


def test_an_existing_run_is_name_equals_workdir():
  assert ttq.parse_existing("main=runs/toy") == ttq.RunSpec("main", (), "runs/toy")
  for text in ("main", "main=", "=runs/toy"):
    with pytest.raises(ValueError, match=re.escape(f"--existing {text!r}")):
      ttq.parse_existing(text)


@pytest.mark.parametrize("argv, message", [
    ([], "no runs: give --run NAME[:key=value,...] or --existing NAME=WORKDIR"),
    (["--run", "a", "--existing", "a=runs/toy"], "run name 'a' is given twice"),
    (["--run", "a", "--split", "heldout"], "--split heldout: the held-out split is reported"),
    (["--run", "a", "--tasks", "t2i,ocr"], "--tasks: unknown task 'ocr'"),
    (["--run", "a", "--eval-steps", "4,x"], "expected comma-separated integers"),
    (["--run", "a", "--samples", "0"], "--eval-every, --samples and --batch-size must be >= 1"),
])
def test_bad_arguments_end_in_one_line_naming_them(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    ttq._parse_args(["--out", "o", "--eval-every", "5", *argv])
  assert exit_.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert message in error and "Traceback" not in error


def test_arguments_parsed():
  args = ttq._parse_args(["--out", "o", "--eval-every", "5", "--run", "shipped", "--run",
                          "no_qk:model.qk_norm=false", "--existing", "main=runs/toy",
                          "--tasks", "t2i,asr", "--eval-steps", "4,10"])
  assert [r.name for r in args.runs] == ["shipped", "no_qk", "main"]
  assert args.runs[2].workdir == "runs/toy" and args.runs[1].workdir is None
  assert (args.tasks, args.eval_steps, args.split, args.samples) == (["t2i", "asr"], [4, 10],
                                                                     "validation", 32)
  assert ttq._parse_args(["--out", "o", "--eval-every", "5", "--run", "a"]).eval_steps == []


def test_each_trained_run_keeps_a_checkpoint_every_eval_every_steps_and_deletes_none(tmp_path):
  args = ttq._parse_args(["--config", str(TINY_EXPERIMENT), "--out", "o", "--eval-every", "3",
                          "--data", "d", "--run", "a:train.stages.stage1.steps=5"])
  # 5 + 4 + 4 steps: at most one checkpoint a step, so keeping 13 deletes none.
  assert ttq.train_overrides(args.runs[0], args) == [
      "train.stages.stage1.steps=5", "eval.after_training=false", "train.checkpoint_every=3",
      "train.keep_checkpoints=13", "data.dir=d", "toyworld.dir=d"]


def test_a_bad_override_fails_before_anything_is_trained_or_written(tmp_path, capsys):
  out = tmp_path / "out"
  code = ttq.main(["--config", str(TINY_EXPERIMENT), "--out", str(out), "--eval-every", "3",
                   "--run", "a", "--run", "b:model.qk_nrom=true"])
  assert code == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1 and "qk_nrom" in error
  assert not out.exists()


# --- the time axis --------------------------------------------------------------------------


def _record(step, stage, tokens_per_s):
  return {"step": step, "stage": stage, "loss": 1.0, "tokens_per_s": tokens_per_s}


def test_training_seconds_sum_the_logged_windows_with_each_stages_compile_taken_out():
  # 100 tokens a step. stage1: steps 1-5 took 10 s (compiling), 6-10 and 11-15 took 1 s and 2 s
  # (median 0.3 s a step); stage2: 16-20 took 5 s (compiling), 21-22 took 0.4 s (0.2 s a step).
  records = [_record(5, "stage1", 500 / 10), _record(15, "stage1", 500 / 2),
             _record(10, "stage1", 500 / 1), _record(20, "stage2", 500 / 5),
             _record(22, "stage2", 200 / 0.4)]
  clock, compile_seconds = ttq.training_clock(records, tokens_per_step=100)
  assert sorted(clock) == [5, 10, 15, 20, 22]
  expected = {5: 1.5, 10: 1.5 + 1, 15: 1.5 + 3, 20: 4.5 + 5 * 0.2, 22: 4.5 + 1 + 0.4}
  for step, seconds in expected.items():
    assert clock[step] == (pytest.approx(seconds), step * 100)
  assert compile_seconds == {"stage1": pytest.approx(10 - 1.5), "stage2": pytest.approx(4)}


def test_a_stage_with_one_window_or_a_faster_first_window_keeps_its_measured_time():
  clock, compile_seconds = ttq.training_clock(
      [_record(4, "stage1", 400 / 2), _record(8, "stage1", 400 / 4), _record(10, "stage2", 1)],
      tokens_per_step=100)
  assert clock[4][0] == pytest.approx(2) and clock[8][0] == pytest.approx(6)
  assert clock[10][0] == pytest.approx(6 + 200)
  assert compile_seconds == {"stage1": 0.0}


def test_records_that_cannot_give_a_time_are_refused():
  with pytest.raises(ValueError, match="metrics record at step 5"):
    ttq.training_clock([_record(5, "stage1", 10), _record(5, "stage1", 10)], 100)
  with pytest.raises(ValueError, match="tokens_per_s > 0"):
    ttq.training_clock([_record(5, "stage1", 0)], 100)


# --- time to 90 % and the tables ------------------------------------------------------------


def _point(step, seconds, **qualities):
  return {"step": step, "seconds": seconds, "tokens": step * 100,
          "results": {task: {"4": {"quality": 0.0},
                             "default": {"quality": q, "chance": {"quality": 0.25}}}
                      for task, q in qualities.items()}}


POINTS = [_point(200, 60.0, t2i=0.5, asr=0.95), _point(100, 30.0, t2i=0.2, asr=0.85),
          _point(300, 90.0, t2i=0.9, asr=0.97)]


def test_time_to_90_percent_is_the_first_evaluated_point_at_or_above_it_at_the_default_steps():
  assert ttq.first_reaching(POINTS, "asr") == {"step": 200, "seconds": 60.0, "tokens": 20000,
                                               "quality": 0.95}
  assert ttq.first_reaching(POINTS, "t2i")["step"] == 300  # exactly 90 % counts
  assert ttq.first_reaching(POINTS, "t2i", threshold=0.91) is None
  summary = ttq.summarize(POINTS, ["t2i", "asr"])
  assert summary["t2i"]["final"] == 0.9 and summary["asr"]["final"] == 0.97
  assert summary["asr"]["chance"] == 0.25


def _result():
  runs = {"shipped": {"workdir": "o/runs/shipped", "existing": False,
                      "overrides": [], "points": POINTS,
                      "summary": ttq.summarize(POINTS, ["t2i", "asr"])},
          "short": {"workdir": "runs/toy", "existing": True, "overrides": [],
                    "points": POINTS[1:2], "summary": ttq.summarize(POINTS[1:2], ["t2i", "asr"])}}
  return {"meta": {"config": "toy.yaml", "split": "validation", "samples": 32,
                   "tasks": ["t2i", "asr"]}, "runs": runs}


def test_the_summary_table_gives_each_runs_final_quality_and_time_to_90_percent():
  assert ttq.format_summary(_result()["runs"], ["t2i", "asr"]).splitlines() == [
      "| run | steps | training time | tokens | t2i | asr |",
      "|---|---:|---:|---:|---|---|",
      "| shipped | 300 | 90 s | 0.03 M | 90.0 %, 90 % at 90 s | 97.0 %, 90 % at 60 s |",
      "| short | 100 | 30 s | 0.01 M | 20.0 %, 90 % not reached | 85.0 %, 90 % not reached |",
      "| chance | | | | 25.0 % | 25.0 % |"]


def test_the_report_holds_the_summary_and_each_runs_curve_and_the_picture_is_a_png(tmp_path):
  report = ttq.format_report(_result())
  assert ttq.format_summary(_result()["runs"], ["t2i", "asr"]) in report
  assert "### short (existing workdir `runs/toy`)" in report
  assert "| 100 | 30 s | 0.01 M | 20.0 % | 85.0 % |\n| 200 | 60 s | 0.02 M | 50.0 % | 95.0 % |" \
      in report
  ttq.plot(_result(), tmp_path / "p.png")
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_benchmark_trains_evaluates_each_kept_checkpoint_and_reads_an_existing_run(tmp_path):
  prepare(tmp_path / "data", ToyWorldSpec(n=40, seed=0, grid=8))
  out = tmp_path / "out"
  two_steps = ",".join(f"train.stages.stage{i}.steps=2" for i in (1, 2, 3))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  done = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "time_to_quality.py"), "--config",
       str(TINY_EXPERIMENT), "--out", str(out), "--data", str(tmp_path / "data"),
       "--eval-every", "3", "--samples", "2", "--tasks", "t2i,caption,asr", "--eval-steps", "2",
       "--run", f"tiny:{two_steps}", "--existing", f"again={out / 'runs' / 'tiny'}"],
      capture_output=True, text=True, timeout=900, env=env)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  result = json.loads((out / "time_to_quality.json").read_text())
  assert result["meta"]["split"] == "validation" and result["meta"]["tasks"] == [
      "t2i", "caption", "asr"]
  tiny, again = result["runs"]["tiny"], result["runs"]["again"]
  assert (tiny["existing"], again["existing"]) == (False, True)
  # Checkpoints at 3 and 6 (every 3) and at the stage ends 2 and 4: all kept, 3 and 6 evaluated.
  steps = sorted(int(p.name) for p in (out / "runs" / "tiny" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [2, 3, 4, 6]
  for run in (tiny, again):
    assert [p["step"] for p in run["points"]] == [3, 6]
    assert [p["tokens"] for p in run["points"]] == [3 * 8 * 192, 6 * 8 * 192]
    assert 0 < run["points"][0]["seconds"] < run["points"][1]["seconds"]
    assert set(run["compile_seconds"]) == {"stage1", "stage2", "stage3"}
    for point in run["points"]:
      assert set(point["results"]) == {"t2i", "caption", "asr"}
      for by_steps in point["results"].values():
        assert set(by_steps) == {"2", "default"}
        assert all(0 <= m["quality"] <= 1 and m["samples"] == 2 for m in by_steps.values())
    for task, summary in run["summary"].items():
      assert summary["final"] == run["points"][1]["results"][task]["default"]["quality"]
  # The existing run is the same workdir: the same time axis.
  assert [p["seconds"] for p in again["points"]] == [p["seconds"] for p in tiny["points"]]
  report = (out / "time_to_quality.md").read_text()
  percents = [float(x) for x in re.findall(r"([\d.]+) %", report) if x != "90"]
  assert percents and all(0 <= x <= 100 for x in percents)
  assert "| tiny | 6 |" in report and "| again | 6 |" in report
  assert (out / "time_to_quality.png").read_bytes()[:4] == b"\x89PNG"
  assert "done at step 6" in (out / "logs" / "tiny.log").read_text()
