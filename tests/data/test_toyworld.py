"""The toy world: determinism, split disjointness, image and speech round trips, tokenizer, tfds."""

import collections
import pathlib

import numpy as np
import pytest

from omnijax.data import record
from omnijax.data.inspect import inspect_split
from omnijax.data.tasks import TASKS
from omnijax.data.toyworld import scenes as scenes_lib
from omnijax.data.toyworld.images import ImageCodebook
from omnijax.data.toyworld.prepare import prepare
from omnijax.data.toyworld.speech import SpeechCodebook
from omnijax.data.toyworld.world import ASSISTANT_SPEAKER, SPLITS, ToyWorldSpec, build, split_scenes

SPEC = ToyWorldSpec(n=30, seed=3, grid=8)


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_is_deterministic_from_the_seed(tmp_path):
  first = prepare(tmp_path / "a", SPEC)
  prepare(tmp_path / "b", SPEC)
  prepare(tmp_path / "c", ToyWorldSpec(n=30, seed=4, grid=8))
  a, b, c = (_files(tmp_path / name) for name in "abc")
  assert a == b
  assert a["train/t2i-00000.array_record"] != c["train/t2i-00000.array_record"]
  assert first["train"]["vocab"] == SPEC.vocab.describe()
  assert set(first["train"]["tasks"]) == set(TASKS)
  assert first["heldout"]["total"]["records"] == 3 * len(TASKS)
  assert first["validation"]["total"]["records"] == 2 * len(TASKS)
  for split in SPLITS:  # every written record passes the inspector
    assert inspect_split(tmp_path / "a" / split)["svqa"]["records"] == first[split]["scenes"]


def test_splits_share_no_scene():
  splits = split_scenes(ToyWorldSpec(n=400, seed=1))
  keys = {name: {scene.key for scene in splits[name]} for name in SPLITS}
  assert {name: len(keys[name]) for name in SPLITS} == {"train": 340, "validation": 20,
                                                         "heldout": 40}
  assert not keys["train"] & keys["heldout"]
  assert not keys["train"] & keys["validation"]
  assert not keys["validation"] & keys["heldout"]


def _count_shares(scenes) -> dict[int, int]:
  counts = collections.Counter(len(scene.things) for scene in scenes)
  return {count: counts[count] for count in range(1, scenes_lib.MAX_OBJECTS + 1)}


@pytest.mark.parametrize("n, seed, cells", [(2000, 0, 2), (400, 1, 2), (600, 5, 3)])
def test_every_split_has_the_same_mix_of_object_counts(n, seed, cells):
  """Each split holds each object count's share of its scenes to within 2 scenes (drawing
  distinct scenes uses up the 64 one-object scenes early: the first 10 % drawn were 19 %
  one-object, the rest 1.4 %)."""
  splits = split_scenes(ToyWorldSpec(n=n, seed=seed, cells=cells, grid=12))
  every = _count_shares([scene for split in splits.values() for scene in split])
  for name, scenes in splits.items():
    for count, number in _count_shares(scenes).items():
      assert abs(number - every[count] * len(scenes) / n) <= 2, (name, count, number)


def test_a_prefix_of_the_held_out_split_is_a_fair_sample():
  """The main job evaluates the first 64 held-out scenes of README's world: they hold no more
  one-object scenes than chance gives (a split in drawing order would hold most of them)."""
  splits = split_scenes(ToyWorldSpec(n=2000, seed=0))
  every = _count_shares([scene for split in splits.values() for scene in split])
  first = _count_shares(splits["heldout"][:64])
  for count, number in first.items():
    expected = 64 * every[count] / 2000
    assert abs(number - expected) <= 3 * expected ** 0.5 + 1, (count, number, expected)


def test_a_negative_seed_is_refused_before_any_draw():
  with pytest.raises(ValueError, match="seed=-1: expected an integer >= 0"):
    ToyWorldSpec(n=10, seed=-1)


def test_split_sizes_leave_every_split_a_scene():
  assert ToyWorldSpec(n=3).split_sizes == {"train": 1, "validation": 1, "heldout": 1}
  assert ToyWorldSpec(n=2000).split_sizes == {"train": 1700, "validation": 100, "heldout": 200}
  with pytest.raises(ValueError, match="n=2: the toy world needs at least 3 scenes"):
    ToyWorldSpec(n=2)
  with pytest.raises(ValueError, match="n=10 with heldout_fraction=0.5 and "
                                       "validation_fraction=0.5 leaves no training scene"):
    ToyWorldSpec(n=10, heldout_fraction=0.5, validation_fraction=0.5)
  with pytest.raises(ValueError, match=r"validation_fraction=1.0 must lie in \(0, 1\)"):
    ToyWorldSpec(n=10, validation_fraction=1.0)


@pytest.mark.parametrize("grid, cells", [(16, 2), (8, 2), (12, 3)])
def test_image_codes_parse_back_to_the_scene(grid, cells):
  codebook = ImageCodebook(grid=grid, cells=cells)
  rng = np.random.default_rng(0)
  for _ in range(200):
    scene = scenes_lib.random_scene(rng, cells)
    codes = codebook.encode(scene, rng)
    assert codes.shape == (grid * grid,) and codes.max() < codebook.codes_used
    assert codebook.decode(codes) == scene
  rgb = codebook.to_rgb(codes, pixels_per_code=2)
  assert rgb.shape == (2 * grid, 2 * grid, 3) and rgb.dtype == np.uint8


def test_image_parser_tolerates_stray_codes_and_writes_png(tmp_path):
  codebook = ImageCodebook(grid=16, cells=2)
  rng = np.random.default_rng(1)
  scene = scenes_lib.random_scene(rng, 2)
  codes = codebook.encode(scene, rng)
  codes[np.flatnonzero(codes < codebook.background_codes)[:3]] = codebook.codes_used - 1
  assert codebook.decode(codes) == scene
  codebook.save_png(codes, tmp_path / "scene.png")
  assert (tmp_path / "scene.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_reads_back_to_its_codes_at_any_pixel_size(tmp_path):
  codebook = ImageCodebook(grid=8, cells=2)
  assert len({tuple(colour) for colour in codebook.palette}) == codebook.codes_used
  rng = np.random.default_rng(2)
  codes = np.concatenate([codebook.encode(scenes_lib.random_scene(rng, 2), rng)[:32],
                          np.linspace(0, codebook.codes_used - 1, 32).astype(np.int32)])
  for pixels in (1, 3, 8):
    codebook.save_png(codes, tmp_path / "scene.png", pixels_per_code=pixels)
    np.testing.assert_array_equal(codebook.load_png(tmp_path / "scene.png"), codes)
  with pytest.raises(ValueError, match="image is 12x12 pixels; .* multiple of 8"):
    codebook.from_rgb(np.zeros((12, 12, 3), np.uint8))
  (tmp_path / "not.png").write_text("hello")
  with pytest.raises(ValueError, match="not.png: not a readable image"):
    codebook.load_png(tmp_path / "not.png")


def test_speech_round_trip_every_speaker():
  lexicon = scenes_lib.lexicon(3)
  speech = SpeechCodebook(lexicon, 256)
  rng = np.random.default_rng(0)
  for speaker in range(speech.speakers):
    words = list(rng.choice(lexicon, size=12))
    codes = speech.encode(words, speaker, rng)
    assert codes.min() >= speaker * speech.units and codes.max() < (speaker + 1) * speech.units
    assert speech.decode(codes) == words


def test_steady_voice_holds_each_unit_for_its_own_length():
  lexicon = scenes_lib.lexicon(2)
  speech = SpeechCodebook(lexicon, 256)
  words = list(np.random.default_rng(1).choice(lexicon, size=20))
  steady = speech.encode(words, 2, None)
  np.testing.assert_array_equal(steady, speech.encode(words, 2, None))
  assert speech.decode(steady) == words
  np.testing.assert_array_equal(speech.encode(words, 0, None), steady - 2 * speech.units)
  # Every run of a unit lasts that unit's one length, wherever it is said ...
  runs = collections.defaultdict(set)
  starts = np.flatnonzero(np.r_[True, steady[1:] != steady[:-1]])
  for begin, end in zip(starts, [*starts[1:], len(steady)]):
    runs[int(steady[begin])].add(int(end - begin))
  assert all(len(lengths) == 1 for lengths in runs.values())
  assert set().union(*runs.values()) <= {1, 2, 3} and len(set().union(*runs.values())) > 1
  # ... while a user's pace varies from one utterance to the next.
  rng = np.random.default_rng(0)
  assert not np.array_equal(speech.encode(words, 2, rng), speech.encode(words, 2, rng))


def test_the_assistant_speaks_in_one_steady_voice_users_in_many():
  world = build(SPEC)
  spec, vocab = world.spec, world.spec.vocab
  speech_of = lambda tokens: vocab.speech_codes(  # noqa: E731
      tokens[(tokens >= vocab.speech_offset) & (tokens < vocab.image_offset)])
  user_speakers = set()
  for sample in world.samples["train"]:
    if sample.task not in ("tts", "svqa", "asr", "s2i"):
      continue
    if sample.task in ("tts", "svqa"):
      spoken = speech_of(sample.response)
      np.testing.assert_array_equal(
          spoken, spec.speech.encode(spec.speech.decode(spoken), ASSISTANT_SPEAKER, None))
    if sample.task != "tts":
      user_speakers |= set((speech_of(sample.prompt) // spec.speech.units).tolist())
  assert user_speakers == set(range(spec.speech.speakers))


def test_tokenizer_fills_text_ids_and_places_specials():
  world = build(SPEC)
  vocab = SPEC.vocab
  assert world.tokenizer.get_vocab_size() == vocab.speech_offset
  for token, expected in vocab.special_tokens.items():
    assert world.tokenizer.token_to_id(token) == expected
  specials = set(vocab.special_tokens.values())
  for split in world.samples.values():
    for sample in split:
      vocab.check_ids(sample.tokens, "a toy-world sample")
      # Below the codes, an id is BPE text or one of the placed specials, never a gap id.
      below_codes = sample.tokens[sample.tokens < vocab.speech_offset]
      assert set(below_codes[below_codes >= vocab.text_size].tolist()) <= specials


def test_every_task_decodes_to_its_scene():
  world = build(SPEC)
  spec = world.spec
  by_task = collections.defaultdict(list)
  for sample in world.samples["train"]:
    by_task[sample.task].append(sample)
  for number, scene in enumerate(world.scenes["train"]):
    t2i = by_task["t2i"][number]
    image = spec.vocab.image_codes(t2i.response[1:1 + spec.images.codes_per_image])
    assert spec.images.decode(image) == scene
    asr = by_task["asr"][number]
    speech = asr.prompt[(asr.prompt >= spec.vocab.speech_offset) & (asr.prompt < spec.vocab.image_offset)]
    transcript = world.tokenizer.decode(asr.response[:-2].tolist())
    assert spec.speech.decode(spec.vocab.speech_codes(speech)) == transcript.split()
    assert transcript == " ".join(scenes_lib.spoken_words(scenes_lib.caption(scene)))


def test_tfds_builder_feeds_the_same_samples(tmp_path):
  import grain
  import tensorflow_datasets as tfds

  from omnijax.data.toyworld import tfds_builder

  source = tfds.data_source("omnijax_toy_world/tiny", split="heldout", data_dir=str(tmp_path))
  samples = list(grain.MapDataset.source(source).map(tfds_builder.to_sample))
  expected = build(tfds_builder.OmnijaxToyWorld.builder_configs["tiny"].spec).samples["heldout"]
  key = lambda s: record.encode(s)
  assert sorted(map(key, samples)) == sorted(map(key, expected))
  metadata = tfds.builder("omnijax_toy_world/tiny", data_dir=str(tmp_path)).info.metadata
  assert metadata["vocab"] == ToyWorldSpec(n=64, grid=8).vocab.describe()
