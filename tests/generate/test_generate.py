"""Decode settings, requests templated like the training data and post-processing (the
`omnijax generate` command on a tiny trained model is tested in tests/eval/test_cli.py)."""

import dataclasses

import numpy as np
import pytest

from omnijax.config import CONFIG_ROOT, load_config
from omnijax.data.requests import request_messages
from omnijax.data.toyworld import scenes as scenes_lib
from omnijax.data.toyworld.world import ToyWorldSpec, build
from omnijax.data.templates import ChatTemplate
from omnijax.diffusion.postprocess import split_modalities
from omnijax.diffusion.sampler import block_plan
from omnijax.generate import settings
from omnijax.generate.run import Generator

SPEC = ToyWorldSpec(n=20, seed=0, grid=8)


@pytest.fixture(scope="module")
def world():
  return build(SPEC)


@pytest.fixture(scope="module")
def generator(world):
  template = ChatTemplate(world.tokenizer, SPEC.vocab, SPEC.image_lengths)
  return Generator(None, SPEC.vocab, template, settings.DecodeConstants.toy_world(SPEC), SPEC)


def test_table_follows_the_release():
  vocab = SPEC.vocab
  release = settings.DecodeConstants()
  assert settings.canvas_length("t2i", release, prompt_tokens=30, text_tokens=0) == 260
  assert settings.default_steps("t2i", 260) == 260  # one token per step
  assert settings.canvas_length("asr", release, prompt_tokens=500, text_tokens=0) == 100
  assert settings.default_steps("asr", 100) == 50
  assert settings.canvas_length("tts", release, prompt_tokens=30, text_tokens=20) == 70
  assert settings.canvas_length("svqa", release, prompt_tokens=30, text_tokens=0) == 128
  decode = settings.decode_settings("svqa", 128, vocab)
  assert decode.prefill == ((25, vocab.begin_audio_id),)  # floor(0.2 x 128)
  assert (decode.alg, decode.repeat_penalty, decode.top_p, decode.block_size) == (
      "entropy", 1.2, 0.9, 0)
  decode = settings.decode_settings("s2i", 260, vocab, steps=16, threshold=0.9, cfg=None)
  assert (decode.cfg, decode.position_penalty, decode.repeat_penalty) == (2.0, 2.0, 1.5)
  assert (decode.steps, decode.threshold) == (16, 0.9)
  with pytest.raises(ValueError, match="unknown decode setting 'temprature'"):
    settings.decode_settings("t2i", 68, vocab, temprature=1.0)
  # The toy world's image is 8 x 8 codes, and its model is trained without the unconditional
  # prompts guidance contrasts with: s2i decodes unguided, unless asked. Its spoken answers
  # have no prefill and decode in blocks of 4 instead; no other task does.
  toy = settings.DecodeConstants.toy_world(SPEC)
  assert settings.decode_settings("svqa", 20, vocab, constants=toy).block_size == 4
  assert settings.decode_settings("svqa", 20, vocab, constants=toy, block_size=0).block_size == 0
  for steps in (1, 2, 3, 4, 5, 6, 10, 20):  # never more blocks than the steps asked for
    decode = settings.decode_settings("svqa", 20, vocab, constants=toy, steps=steps)
    assert len(block_plan(20, steps, decode.block_size)) <= steps
  assert settings.decode_settings("svqa", 20, vocab, constants=toy, steps=10).block_size == 4
  assert {settings.decode_settings(task, 68, vocab, constants=toy).block_size
          for task in settings.TABLE if task != "svqa"} == {0}
  assert settings.canvas_length("t2i", toy, prompt_tokens=1, text_tokens=0) == 68
  assert settings.decode_settings("s2i", 68, vocab, constants=toy).cfg == 0.0
  assert settings.decode_settings("s2i", 68, vocab, constants=toy, cfg=2.0).cfg == 2.0


def media(prompt, vocab):
  """(image codes, speech codes) runs in a prompt, in order."""
  parts = split_modalities(prompt, vocab)
  return (parts.image if parts.image.size else None, parts.speech if parts.speech.size else None)


def test_requests_are_templated_like_the_training_data(world, generator):
  vocab = SPEC.vocab
  checked = set()
  for number, sample in enumerate(world.samples["train"]):
    scene = world.scenes["train"][number // 7]
    image, speech = media(sample.prompt, vocab)
    if sample.task in ("t2i", "tts"):
      request = generator.request(sample.task, text=scenes_lib.caption(scene))
    elif sample.task in ("asr", "s2i"):
      request = generator.request(sample.task, speech_codes=speech)
    elif sample.task == "svqa":
      # The question is spoken, then the image: both come out of the prompt in that order.
      request = generator.request("svqa", speech_codes=speech, image_codes=image)
    else:
      continue
    np.testing.assert_array_equal(request.prompt, sample.prompt)
    checked.add(sample.task)
  assert checked == {"t2i", "tts", "asr", "s2i", "svqa"}
  with pytest.raises(ValueError, match="task vqa needs a text input"):
    generator.request("vqa", image_codes=np.zeros(64, np.int32))
  with pytest.raises(ValueError, match="task asr needs speech codes"):
    generator.request("asr")
  with pytest.raises(ValueError, match="task t2i takes no image input"):
    generator.request("t2i", text="a", image_codes=np.zeros(64, np.int32))


def test_canvases_fit_every_held_out_response(world, generator):
  for sample in world.samples["heldout"] + world.samples["train"]:
    request = generator.request_from_sample(sample)
    assert request.canvas >= len(sample.response), (sample.task, request.canvas)


def test_the_main_jobs_canvases_hold_its_longest_responses_and_one_pad_as_trained():
  """On README's toy world every training response fits its canvas with one tail pad after it
  (training shows at least one: a response up to the canvas's end is one the model never saw),
  and no rule is looser than that: past the response the model only ever saw its tail pads
  (1-16; TTS and captions, whose canvases leave more room, up to theirs), and the former slack
  cost the long config's model 11-27 points on captions, ASR and TTS (docs/benchmarks.md).
  Nothing is prefilled where training never puts it: the spoken answers' audio, which the
  release's 20 % would place after where it begins."""
  config = load_config(CONFIG_ROOT / "experiments" / "toy.yaml")
  toy = config.toyworld
  spec = ToyWorldSpec(n=toy.scenes, seed=toy.seed, grid=toy.grid, cells=toy.cells)
  world = build(spec)
  template = ChatTemplate(world.tokenizer, spec.vocab, spec.image_lengths)
  constants = settings.DecodeConstants.toy_world(spec)
  generator = Generator(None, spec.vocab, template, constants, spec)
  # The rules a hundredth of a code a prompt token (ASR) and half a code a text token (TTS)
  # shorter must each leave some response without its pad.
  tighter = Generator(None, spec.vocab, template, dataclasses.replace(
      constants, asr_per_prompt_token=constants.asr_per_prompt_token - 0.01,
      tts_per_text_token=constants.tts_per_text_token - 0.5), spec)
  pad = config.data.tail_pads_min
  longest, slack, tighter_fits = {}, {}, {"asr": True, "tts": True}
  audio_begins = set()
  for number, sample in enumerate(world.samples["train"]):
    task, response = sample.task, len(sample.response)
    if task == "svqa":
      audio_begins.add(list(sample.response).index(spec.vocab.begin_audio_id))
    room = 0 if task in ("t2i", "s2i") else pad  # images have one length: no pad tells it
    assert generator.request_from_sample(sample).canvas >= response + room, (task, number)
    assert generator.rule_canvas(task, sample.prompt) >= response + room, (task, number)
    longest[task] = max(longest.get(task, 0), response)
    slack[task] = max(slack.get(task, 0), generator.rule_canvas(task, sample.prompt) - response)
    if task in tighter_fits:
      tighter_fits[task] &= tighter.rule_canvas(task, sample.prompt) >= response + pad
  assert (constants.caption, constants.svqa) == (longest["caption"] + pad, longest["svqa"] + pad)
  assert constants.image_codes + 4 == longest["t2i"] == longest["s2i"]
  assert constants.vqa - longest["vqa"] <= config.data.tail_pads_max  # the release's 8
  # Every canvas position past a response is one training showed as a pad after that task's
  # responses: TTS's and a one-object caption's slack is wider than the default 16.
  pads_max = config.data.task_tail_pads_max
  assert all(room <= pads_max.get(task, config.data.tail_pads_max)
             for task, room in slack.items()), slack
  assert slack["tts"] > config.data.tail_pads_max and slack["caption"] > config.data.tail_pads_max
  assert tighter_fits == {"asr": False, "tts": False}
  # Spoken answers: the audio begins right after a one- or two-word text answer, before the
  # release's prefill at 20 % of the canvas, so the toy world leaves its place to the model.
  release_at = settings.decode_settings("svqa", constants.svqa, spec.vocab).prefill[0][0]
  assert max(audio_begins) < release_at and len(audio_begins) > 1
  assert settings.decode_settings("svqa", constants.svqa, spec.vocab,
                                  constants=constants).prefill == ()


def test_postprocessing_recovers_the_ground_truth(world, generator):
  for number, sample in enumerate(world.samples["heldout"]):
    scene = world.scenes["heldout"][number // 7]
    out = generator.postprocess(sample.task, sample.response, 0)
    if sample.task in ("t2i", "s2i"):
      assert out.scene == scene and out.image_codes.shape == (64,)
    elif sample.task in ("caption", "asr"):
      assert out.text == scenes_lib.caption(scene)
    elif sample.task == "tts":
      assert out.words == scenes_lib.spoken_words(scenes_lib.caption(scene))
    elif sample.task == "svqa":
      # The spoken answer repeats the text answer.
      assert out.text and out.words == scenes_lib.spoken_words(out.text)
    else:
      assert out.text


def test_request_messages_are_the_release_templates():
  assert request_messages("s2i")[0] == {"role": "system",
                                        "content": "Please generate an image based on the input audio."}
  assert request_messages("caption")[0]["content"] == "Describe the image.\n<|image|>"


def test_steps_and_batch_size_below_one_are_refused_and_none_means_the_default():
  from omnijax.config import ConfigError
  vocab = SPEC.vocab
  default = settings.default_steps("caption", 32)
  assert settings.decode_settings("caption", 32, vocab).steps == default
  assert settings.decode_settings("caption", 32, vocab, steps=3).steps == 3
  with pytest.raises(ConfigError, match="--steps 0: expected >= 1"):
    settings.decode_settings("caption", 32, vocab, steps=0)
  with pytest.raises(ConfigError, match="--batch-size 0: expected >= 1"):
    Generator(None, vocab, None, None, batch_size=0)


def test_the_decoder_follows_the_objective_and_ar_refuses_diffusion_only_settings(generator):
  from omnijax.config import ConfigError
  from omnijax.generate.run import DECODE, run_decoder
  from omnijax.diffusion import ar_decode, sampler

  toy = load_config(CONFIG_ROOT / "experiments" / "toy.yaml")
  assert run_decoder(toy) == "diffusion"
  assert run_decoder(load_config(CONFIG_ROOT / "experiments" / "toy.yaml",
                                 ["train.objective.kind=ar"])) == "ar"
  assert DECODE == {"diffusion": sampler.decode, "ar": ar_decode.decode}
  ar = Generator(None, SPEC.vocab, generator.template, generator.constants, SPEC, decoder="ar")
  request = generator.request("t2i", text="there is a red circle at the top left")
  for given, flag in ((dict(steps=4), "--steps"), (dict(threshold=0.9), "--threshold"),
                      (dict(position_penalty=2.0), "--position-penalty"),
                      (dict(alg="entropy"), "--alg"), (dict(block_size=8), "--block-size"),
                      (dict(cache="prefix"), "--cache"),
                      (dict(cache_refresh=2), "--cache-refresh")):
    with pytest.raises(ValueError, match=f"{flag}: the ar decoder makes one token per forward "
                                         "pass"):
      ar.decode([request], **given)
  with pytest.raises(ConfigError, match="--decoder beam: expected one of diffusion, ar"):
    Generator(None, SPEC.vocab, None, None, decoder="beam")


def test_audio_input_is_refused_by_a_run_without_continuous_speech(generator):
  with pytest.raises(ValueError, match=r"speech said\.wav: this run takes no continuous speech "
                                       "input"):
    generator.request("asr", speech_audio="said.wav")
  with pytest.raises(ValueError, match="give speech as codes or as an audio file, not both"):
    generator.request("asr", speech_codes=[1, 2], speech_audio="said.wav")
