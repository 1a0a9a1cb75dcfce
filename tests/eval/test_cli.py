"""`omnijax generate` and `omnijax eval` on a tiny trained model, and the main job's eval step.

The fixture trains the tiny experiment through the `omnijax train` command with
`eval.after_training` on, so the main job's path (train, then eval.json and its pictures) runs
once and leaves the workdir the other tests read.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from omnijax.config import CONFIG_ROOT, load_config
from omnijax.data.tasks import IMAGE_TASKS, TASKS
from omnijax.data.templates import ChatTemplate
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.scenes import Scene, Thing
from omnijax.data.toyworld.world import ToyWorldSpec
from omnijax.eval.metrics import task_metrics
from omnijax.generate.run import Output, read_samples

TINY_EXPERIMENT = pathlib.Path(__file__).parents[1] / "train" / "tiny_experiment.yaml"
PNG_MAGIC = b"\x89PNG"


def omnijax(*args):
  return subprocess.run([sys.executable, "-m", "omnijax.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("experiment", ["toy.yaml", "toy_long.yaml"])
def test_the_toy_jobs_evaluate_enough_samples_that_one_moves_a_task_by_2_points(experiment):
  config = load_config(CONFIG_ROOT / "experiments" / experiment)
  assert config.eval.after_training and config.eval.split == "heldout"
  assert 100 / config.eval.samples <= 2
  # ... and their toy world holds that many held-out scenes.
  toy = config.toyworld
  spec = ToyWorldSpec(n=toy.scenes, seed=toy.seed, grid=toy.grid, cells=toy.cells)
  assert spec.split_sizes["heldout"] >= config.eval.samples


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("trained")
  prepare(root / "data", ToyWorldSpec(n=20, seed=0, grid=8))
  workdir = root / "run"
  done = omnijax("train", "--config", TINY_EXPERIMENT, "--workdir", workdir,
                 f"data.dir={root / 'data'}", "train.stages.stage1.steps=2",
                 "train.stages.stage2.steps=2", "train.stages.stage3.steps=2",
                 "eval.after_training=true", "eval.samples=2", "eval.steps=[2]")
  assert done.returncode == 0, done.stdout + done.stderr
  return workdir, root / "data"


def test_the_main_job_writes_eval_json_and_pictures(trained):
  workdir, _ = trained
  results = json.loads((workdir / "eval.json").read_text())
  assert results["meta"]["step"] == 6 and results["meta"]["limit"] == 2
  assert set(results) - {"meta"} == set(TASKS)
  for task in TASKS:
    assert set(results[task]) == {"2", "default"}
    assert results[task]["2"]["forward_passes"] <= 2
    assert results[task]["2"]["samples"] == 2
    assert results[task]["2"]["quality"] <= 1.0
  for picture in ("eval.png", "eval_samples.png"):
    assert (workdir / picture).read_bytes()[:4] == PNG_MAGIC
  # Chance baselines from the training split, beside every figure.
  assert results["meta"]["chance_split"] == "train"
  for task in TASKS:
    for entry in results[task].values():
      assert set(entry["chance"]) <= set(entry) and entry["chance"]["quality"] <= 1.0
  assert results["caption"]["2"]["chance"]["exact_scene"] == 0.0  # no held-out scene trained on


def _scene(key: str) -> Scene:
  return Scene(tuple(Thing(int(cell), shape, colour)
                     for cell, colour, shape in (part.split(":") for part in key.split(";") if part)))


def _output(task: str, described: dict) -> Output:
  scene = _scene(described["scene"]) if task in IMAGE_TASKS else None
  return Output(task, np.zeros(0, np.int32), 0, text=described["text"],
                words=described.get("words"), scene=scene)


def _template(data: pathlib.Path) -> ChatTemplate:
  spec = ToyWorldSpec(n=20, seed=0, grid=8)
  return ChatTemplate.from_file(str(data / "tokenizer.json"), spec.vocab, spec.image_lengths)


def test_samples_jsonl_holds_every_sample_and_re_scores_to_eval_json(trained):
  workdir, data = trained
  results = json.loads((workdir / "eval.json").read_text())
  records = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
  assert len(records) == len(TASKS) * 2 * 2  # tasks x step settings x samples
  grouped: dict = {}
  for record in records:
    assert {"task", "steps", "index", "prompt", "reference", "output", "score"} <= set(record)
    grouped.setdefault((record["task"], record["steps"]), []).append(record)
  heldout_vqa = read_samples(data / "heldout", "vqa", 2)
  for (task, key), group in grouped.items():
    assert [r["index"] for r in group] == [0, 1]
    outputs = [_output(task, r["output"]) for r in group]
    references = [_output(task, r["reference"]) for r in group]
    kinds = [r["question_kind"] for r in group] if task in ("vqa", "svqa") else None
    scenes = [_scene(r["question_scene"]) for r in group] if task in ("vqa", "svqa") else None
    expected = {name: value for name, value in results[task][key].items()
                if name not in ("forward_passes", "seconds_per_sample", "samples", "chance")}
    assert task_metrics(task, outputs, references, cells=2, kinds=kinds,
                        scenes=scenes) == pytest.approx(expected)
    if task in ("t2i", "s2i", "caption", "vqa"):  # headline accuracies: the mean of the scores
      assert np.mean([r["score"] for r in group]) == pytest.approx(expected["quality"])
  vqa = grouped["vqa", "default"]
  assert all(r["question_kind"] in ("count", "position", "colour", "shape") for r in vqa)
  # The prompt, readable: the held-out sample's, media code runs abbreviated.
  template = _template(data)
  assert [r["prompt"] for r in vqa] == [template.readable(s.prompt) for s in heldout_vqa]
  assert "[64 image codes:" in vqa[0]["prompt"]
  assert len(grouped["t2i", "2"][0]["output"]["image_codes"]) == 64


def test_generate_t2i_tts_and_a_batch_from_jsonl(trained, tmp_path):
  workdir, data = trained
  done = omnijax("generate", "--checkpoint", workdir, "--task", "t2i", "--text",
                 "there is a red circle at the top left", "--steps", 3, "--out", tmp_path / "t2i")
  assert done.returncode == 0, done.stderr
  record = json.loads((tmp_path / "t2i" / "results.jsonl").read_text())
  assert len(record["image_codes"]) == 64 and record["forward_passes"] <= 3
  assert pathlib.Path(record["png"]).read_bytes()[:4] == PNG_MAGIC
  assert "scene" in record
  done = omnijax("generate", "--checkpoint", workdir, "--task", "t2i", "--text",
                 "there is a red circle at the top left", "--steps", 3, "--cache", "prefix",
                 "--cache-refresh", 1, "--out", tmp_path / "t2i_cached")
  assert done.returncode == 0, done.stderr
  # The prompt's cache refreshed every step: the uncached tokens.
  cached = json.loads((tmp_path / "t2i_cached" / "results.jsonl").read_text())
  assert cached["canvas"] == record["canvas"]

  done = omnijax("generate", "--checkpoint", workdir, "--task", "tts", "--text",
                 "there is a blue square", "--out", tmp_path / "tts")
  assert done.returncode == 0, done.stderr
  record = json.loads((tmp_path / "tts" / "results.jsonl").read_text())
  assert isinstance(record["transcript"], str) and "speech_codes" in record

  speech = [s.prompt for s in read_samples(data / "heldout", "asr", 2)]
  vocab_offset = json.loads((data / "heldout" / "manifest.json").read_text())["vocab"]
  codes = [(p[(p >= vocab_offset["speech_offset"]) & (p < vocab_offset["image_offset"])]
            - vocab_offset["speech_offset"]).tolist() for p in speech]
  requests = tmp_path / "asr.jsonl"
  requests.write_text("\n".join(json.dumps({"speech_codes": c}) for c in codes) + "\n")
  done = omnijax("generate", "--checkpoint", workdir, "--task", "asr", "--input", requests,
                 "--out", tmp_path / "asr", "--steps", 2, "--threshold", 0.5)
  assert done.returncode == 0, done.stderr
  lines = (tmp_path / "asr" / "results.jsonl").read_text().splitlines()
  assert [json.loads(line)["index"] for line in lines] == [0, 1]
  assert "batch" in done.stderr  # the progress bar


def test_a_png_image_reads_as_its_codes(trained, tmp_path):
  workdir, data = trained
  manifest = json.loads((data / "heldout" / "manifest.json").read_text())
  offset, size = manifest["vocab"]["image_offset"], manifest["vocab"]["n_image_codes"]
  prompt = read_samples(data / "heldout", "caption", 1)[0].prompt
  codes = (prompt[(prompt >= offset) & (prompt < offset + size)] - offset).tolist()
  ToyWorldSpec(n=20, seed=0, grid=8).images.save_png(codes, tmp_path / "scene.png")
  requests = tmp_path / "images.jsonl"
  requests.write_text(json.dumps({"image": "scene.png"}) + "\n"
                      + json.dumps({"image_codes": codes}) + "\n")
  done = omnijax("generate", "--checkpoint", workdir, "--task", "caption", "--input", requests,
                 "--steps", 2, "--out", tmp_path / "out")
  assert done.returncode == 0, done.stderr
  from_png, from_codes = map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().split("\n")[:2])
  assert from_png["canvas"] == from_codes["canvas"]


def test_bad_requests_get_one_clear_line(trained, tmp_path):
  workdir, _ = trained
  requests = tmp_path / "bad.jsonl"
  requests.write_text('{"text": "a"}\n{"txt": "b"}\n')
  for args, message in [
      (("--task", "t2i", "--input", requests), f"{requests}:2: unknown key 'txt'"),
      (("--task", "asr"), "task asr needs speech codes"),
      (("--task", "vqa", "--text", "what?", "--image-codes", "1,2,x"), "--image-codes '1,2,x'"),
      (("--task", "caption", "--image", requests), f"{requests}: not a readable image"),
  ]:
    done = omnijax("generate", "--checkpoint", workdir, *args, "--out", tmp_path / "o")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
  done = omnijax("eval", "--checkpoint", workdir, "--tasks", "t2i,dance", "--out",
                 tmp_path / "e.json")
  assert done.returncode == 2 and "unknown task 'dance'" in done.stderr
  done = omnijax("eval", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "e.json")
  assert done.returncode == 2 and "Traceback" not in done.stderr


def test_eval_command_json_is_keyed_by_task_and_steps(trained, tmp_path):
  workdir, _ = trained
  out = tmp_path / "eval.json"
  done = omnijax("eval", "--checkpoint", workdir, "--split", "heldout", "--tasks", "t2i,vqa",
                 "--steps", "1,3", "--limit", 2, "--out", out)
  assert done.returncode == 0, done.stderr
  results = json.loads(out.read_text())
  assert set(results) == {"meta", "t2i", "vqa"}
  assert results["t2i"]["1"]["forward_passes"] == 1 and results["t2i"]["3"]["forward_passes"] == 3
  assert results["t2i"]["default"]["forward_passes"] == 68  # one token per step (§4.8)
  assert {"exact_scene", "object_accuracy", "seconds_per_sample"} <= set(results["t2i"]["1"])
  # The binding figures of the questions' own scenes: the random-object chance depends on the
  # data alone, the same at every step count.
  vqa = results["vqa"]
  assert {"object_chance", "names_scene_value"} <= set(vqa["1"])
  assert vqa["1"]["object_chance"] == vqa["3"]["object_chance"] == vqa["default"]["object_chance"]
  assert "object_chance" not in vqa["1"]["chance"]
  assert "| t2i |" in done.stdout and "| chance |" in done.stdout
  assert (tmp_path / "eval.png").read_bytes()[:4] == PNG_MAGIC
  assert (tmp_path / "samples.jsonl").is_file()


def test_eval_on_the_validation_split_writes_samples_named_after_its_json(trained, tmp_path):
  workdir, data = trained
  out = tmp_path / "validation.json"
  done = omnijax("eval", "--checkpoint", workdir, "--split", "validation", "--tasks", "caption",
                 "--steps", "2", "--limit", 1, "--out", out)
  assert done.returncode == 0, done.stderr
  results = json.loads(out.read_text())
  assert results["meta"]["split"] == "validation"
  assert {"exact_scene", "object_f1", "well_formed", "wer", "chance"} <= set(results["caption"]["2"])
  records = [json.loads(line) for line in
             (tmp_path / "validation_samples.jsonl").read_text().splitlines()]
  assert [(r["steps"], r["index"]) for r in records] == [("2", 0), ("default", 0)]
  # The validation split's first caption sample, not the held-out one.
  template = _template(data)
  prompt = template.readable(read_samples(data / "validation", "caption", 1)[0].prompt)
  assert records[0]["prompt"] == prompt
  assert prompt != template.readable(read_samples(data / "heldout", "caption", 1)[0].prompt)


def test_eval_takes_the_cache_flags_and_the_dual_cache_refreshed_every_step_is_exact(trained,
                                                                                    tmp_path):
  workdir, _ = trained
  samples = {}
  for name, flags in (("plain", []), ("dual", ["--cache", "dual", "--cache-refresh", 1])):
    done = omnijax("eval", "--checkpoint", workdir, "--tasks", "t2i,tts", "--steps", 3,
                   "--limit", 2, *flags, "--out", tmp_path / f"{name}.json")
    assert done.returncode == 0, done.stderr
    samples[name] = [json.loads(line) for line in
                     (tmp_path / f"{name}_samples.jsonl").read_text().splitlines()]
  assert [r["output"] for r in samples["dual"]] == [r["output"] for r in samples["plain"]]
  meta = json.loads((tmp_path / "dual.json").read_text())["meta"]
  assert (meta["cache"], meta["cache_refresh"]) == ("dual", 1)
  # The settings reach every task's decode, checked before anything decodes; the ar decoder
  # has no cache.
  for flags, message in ((["--cache-refresh", -1], "cache_refresh=-1 must be an integer >= 0"),
                         (["--decoder", "ar", "--cache", "dual"],
                          "--cache: the ar decoder makes one token per forward pass")):
    done = omnijax("eval", "--checkpoint", workdir, "--tasks", "t2i", "--steps", 3, "--limit", 1,
                   *flags, "--out", tmp_path / "refused.json")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr
    assert not (tmp_path / "refused.json").exists()


@pytest.fixture(scope="module")
def trained_ar(trained, tmp_path_factory):
  """The tiny experiment trained with the autoregressive objective, the main job's eval on."""
  _, data = trained
  workdir = tmp_path_factory.mktemp("trained_ar") / "run"
  done = omnijax("train", "--config", TINY_EXPERIMENT, "--workdir", workdir, f"data.dir={data}",
                 "train.objective.kind=ar", "train.stages.stage1.steps=2",
                 "train.stages.stage2.steps=2", "train.stages.stage3.steps=2",
                 "eval.after_training=true", "eval.samples=2", "eval.steps=[2]")
  assert done.returncode == 0, done.stdout + done.stderr
  return workdir, data


def tokens_until_stop(canvas, vocab):
  """One forward pass per token, the stop token (<|im_end|>, <|endoftext|>) included."""
  stops = [i for i, token in enumerate(canvas) if token in (vocab["im_end_id"], vocab["pad_id"])]
  return stops[0] + 1 if stops else len(canvas)


def test_an_ar_run_decodes_one_token_per_forward_pass_in_eval_and_generate(trained_ar, tmp_path):
  workdir, _ = trained_ar
  vocab = load_config(TINY_EXPERIMENT).model.vocab.build()
  ids = {"im_end_id": vocab.im_end_id, "pad_id": vocab.pad_id}
  results = json.loads((workdir / "eval.json").read_text())
  assert results["meta"]["decoder"] == "ar"
  for task in TASKS:  # every task and metric, at the one setting the ar decoder has
    assert set(results[task]) == {"default"}
    assert results[task]["default"]["samples"] == 2 and results[task]["default"]["quality"] <= 1
  done = omnijax("generate", "--checkpoint", workdir, "--task", "t2i", "--text",
                 "there is a red circle at the top left", "--out", tmp_path / "t2i")
  assert done.returncode == 0, done.stderr
  record = json.loads((tmp_path / "t2i" / "results.jsonl").read_text())
  assert len(record["image_codes"]) == 64 and len(record["canvas"]) == 68
  assert record["forward_passes"] == tokens_until_stop(record["canvas"], ids)
  done = omnijax("generate", "--checkpoint", workdir, "--task", "t2i", "--text", "a", "--steps",
                 4, "--out", tmp_path / "o")
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert "--steps: the ar decoder makes one token per forward pass" in done.stderr
  # `--decoder` overrides the run's: its diffusion sampler at 2 steps.
  done = omnijax("eval", "--checkpoint", workdir, "--tasks", "vqa", "--steps", 2, "--limit", 2,
                 "--decoder", "diffusion", "--out", tmp_path / "e.json")
  assert done.returncode == 0, done.stderr
  diffusion = json.loads((tmp_path / "e.json").read_text())
  assert set(diffusion["vqa"]) == {"2", "default"} and diffusion["vqa"]["2"]["forward_passes"] <= 2


def test_generate_with_the_ar_decoder_on_a_diffusion_run(trained, tmp_path):
  workdir, _ = trained
  vocab = load_config(TINY_EXPERIMENT).model.vocab.build()
  done = omnijax("generate", "--checkpoint", workdir, "--task", "vqa", "--text", "what?",
                 "--image-codes", ",".join(["3"] * 64), "--decoder", "ar", "--out", tmp_path)
  assert done.returncode == 0, done.stderr
  record = json.loads((tmp_path / "results.jsonl").read_text())
  assert record["forward_passes"] == tokens_until_stop(
      record["canvas"], {"im_end_id": vocab.im_end_id, "pad_id": vocab.pad_id})
