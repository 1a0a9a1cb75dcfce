"""The sampler's rules against hand-checked cases, and its batch behaviour on a real model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.config import load_config
from omnijax.diffusion import sample, sample_with_stats
from omnijax.diffusion import sampler as sampler_lib
from omnijax.diffusion.postprocess import image_grid, split_modalities, spoken_answer, trim
from omnijax.diffusion.settings import DecodeSettings
from omnijax.model.build import create_model
from omnijax.sharding import make_mesh
from omnijax.config import MeshConfig
from omnijax.vocab import Vocab

VOCAB = Vocab.compact(100, n_image_codes=16, n_speech_codes=16)  # size 177
MODEL_ROWS = 192  # embedding rows: 177 ids + padding rows that must never be produced


@dataclasses.dataclass(frozen=True)
class FakeConfig:
  vocab_size: int = MODEL_ROWS


class MaskCounter(nnx.Module):
  """Logits that reveal when a position was decoded: at every position the peak is on token
  `10 + (number of masks in the row)`, with a strength `peak[position]`, so the committed token
  says how many masks were left and the strengths decide the order."""

  def __init__(self, peak):
    self.config = FakeConfig()
    self.peak = nnx.Param(jnp.asarray(peak, jnp.float32))

  def __call__(self, input_ids, segment_ids, positions):
    masks = jnp.sum(input_ids == VOCAB.mask_id, axis=-1)
    target = jax.nn.one_hot(10 + masks, MODEL_ROWS)[:, None, :]
    return target * self.peak[...][positions][..., None]


FORWARD_SHAPES = []


class TwoTables(nnx.Module):
  """Logits = W[distance to the row's last real token] + U[the row's first token]: a canvas
  position sees the same W term in a conditional and an unconditional row only when aligned."""

  def __init__(self, seed=0):
    self.config = FakeConfig()
    rng = np.random.default_rng(seed)
    self.w = nnx.Param(jnp.asarray(rng.normal(size=(64, MODEL_ROWS)), jnp.float32))
    self.u = nnx.Param(jnp.asarray(rng.normal(size=(MODEL_ROWS, MODEL_ROWS)), jnp.float32))

  def __call__(self, input_ids, segment_ids, positions):
    FORWARD_SHAPES.append(input_ids.shape)  # at trace time: one entry per forward in the loop
    last = jnp.sum(segment_ids > 0, axis=-1, keepdims=True) - 1
    return self.w[...][last - positions] + self.u[...][input_ids[:, :1]]


def prompt(n, start=1):
  return np.arange(start, start + n, dtype=np.int32)


# --- the schedule ---------------------------------------------------------------------------

def test_commit_counts_follow_the_linear_schedule():
  # canvas 10, 4 steps: ts = 1, .75025, .5005, .25075 -> floor(10*.24975)=2, floor(8*.3329)=2,
  # floor(6*.4990)=2, then all 4 at the last step.
  m, expected = 10, [2, 2, 2, 4]
  for step, k in enumerate(expected):
    masked = jnp.arange(10)[None] < m
    got = sampler_lib.commit_counts(masked, jnp.zeros((1, 10)), jnp.int32(step), jnp.int32(4),
                                    None)
    assert int(got[0]) == k, (step, int(got[0]))
    m -= k


def test_schedule_order_and_counts_in_the_loop():
  # Confidence falls with position: each step takes the leftmost k masked positions, and the
  # token records how many masks were left. Prompt of 3 tokens, canvas 10, 4 steps.
  model = MaskCounter(peak=10.0 - 0.1 * np.arange(64))
  result = sample_with_stats(model, VOCAB, [prompt(3)], canvas=10, steps=4)
  np.testing.assert_array_equal(result.canvases[0] - 10, [10, 10, 8, 8, 6, 6, 4, 4, 4, 4])
  assert result.forward_passes.tolist() == [4] and result.loop_steps == 4
  # steps >= canvas: one token per step, min(steps, canvas) passes.
  result = sample_with_stats(model, VOCAB, [prompt(3)], canvas=5, steps=50)
  np.testing.assert_array_equal(result.canvases[0] - 10, [5, 4, 3, 2, 1])
  assert result.loop_steps == 5


def test_dream_shift_scores_position_j_with_the_logits_at_j_minus_1():
  # Peaks rise to the right except at absolute position 5, the strongest. Prompt of 3: position
  # 5 scores canvas index 3, which must be decoded first.
  peak = np.linspace(1.0, 2.0, 64)
  peak[5] = 50.0
  out = sample(MaskCounter(peak), VOCAB, [prompt(3)], canvas=6, steps=6)[0]
  assert out[3] - 10 == 6  # decoded while all 6 masks were left
  np.testing.assert_array_equal(out - 10, [1, 2, 3, 6, 4, 5])  # then right to left


def test_block_decoding_goes_left_to_right():
  assert sampler_lib.block_plan(10, 10, 4) == ((0, 4, 4), (4, 8, 4), (8, 10, 2))
  assert sampler_lib.block_plan(10, 4, 4) == ((0, 4, 2), (4, 8, 1), (8, 10, 1))
  assert sampler_lib.block_plan(10, 4, 0) == ((0, 10, 4),)
  # Confidence rises to the right: without blocks the right end goes first; with blocks of 4,
  # block by block, right to left inside each.
  model = MaskCounter(peak=1.0 + 0.1 * np.arange(64))
  out = sample(model, VOCAB, [prompt(2)], canvas=10, steps=10, block_size=4)[0]
  np.testing.assert_array_equal(out - 10, [7, 8, 9, 10, 3, 4, 5, 6, 1, 2])
  out = sample(model, VOCAB, [prompt(2)], canvas=10, steps=10)[0]
  np.testing.assert_array_equal(out - 10, np.arange(1, 11))


def test_threshold_commits_every_confident_position_at_once():
  # Positions 0-4 of the canvas are certain (p ~ 1), 5-9 uncertain (p ~ 0.02): with threshold
  # 0.5 the first pass commits five, then one per pass: 6 passes instead of 10.
  peak = np.full(64, 0.1)
  peak[2:7] = 30.0  # prompt of 3: logits at 2..6 score canvas 0..4
  model = MaskCounter(peak)
  result = sample_with_stats(model, VOCAB, [prompt(3)], canvas=10, steps=10, threshold=0.5)
  np.testing.assert_array_equal(result.canvases[0][:5] - 10, [10] * 5)
  assert result.loop_steps == 6 and result.forward_passes.tolist() == [6]
  np.testing.assert_array_equal(result.canvases[0][5:] - 10, [5, 4, 3, 2, 1])
  # `steps` stays the ceiling: at 2 steps the second pass commits the rest.
  result = sample_with_stats(model, VOCAB, [prompt(3)], canvas=10, steps=2, threshold=0.5)
  assert result.loop_steps == 2
  np.testing.assert_array_equal(result.canvases[0] - 10, [10] * 5 + [5] * 5)


def test_prefill_is_kept_and_not_counted_as_masked():
  model = MaskCounter(peak=10.0 - 0.1 * np.arange(64))
  boa = VOCAB.begin_audio_id
  out = sample(model, VOCAB, [prompt(3)], canvas=6, steps=6, prefill={2: boa})[0]
  np.testing.assert_array_equal(out, [10 + 5, 10 + 4, boa, 10 + 3, 10 + 2, 10 + 1])
  with pytest.raises(ValueError, match="prefill offset 6 is outside the canvas"):
    sample(model, VOCAB, [prompt(3)], canvas=6, steps=6, prefill={6: boa})


# --- token choice -----------------------------------------------------------------------------

def plan(**changes):
  return sampler_lib.Plan.of(DecodeSettings(canvas=4, steps=4, **changes), VOCAB)


def logits_for(probs, rows=MODEL_ROWS):
  """[len(probs)] probabilities on ids 0.. -> [1, 1, rows] logits (the rest ~ probability 0)."""
  logits = np.full((1, 1, rows), -1e9, np.float32)
  logits[0, 0, :len(probs)] = np.log(probs)
  return jnp.asarray(logits)


def masked_canvas(n=1):
  return jnp.full((1, n), VOCAB.mask_id, jnp.int32)


def test_never_the_mask_id_or_an_embedding_padding_row():
  logits = np.zeros((1, 1, MODEL_ROWS), np.float32)
  logits[0, 0, VOCAB.mask_id] = 9.0
  logits[0, 0, VOCAB.size + 3] = 8.0  # a padding row of the embedding
  logits[0, 0, 42] = 1.0
  tokens, _ = sampler_lib.choose_tokens(jnp.asarray(logits), masked_canvas(), plan(), None)
  assert int(tokens[0, 0]) == 42


def test_confidence_algorithms():
  logits = logits_for([0.5, 0.3, 0.2])
  expected = {"maskgit_plus": 0.5, "topk_margin": 0.2,
              "entropy": sum(p * np.log(p + 1e-10) for p in (0.5, 0.3, 0.2))}
  for alg, value in expected.items():
    tokens, confidence = sampler_lib.choose_tokens(logits, masked_canvas(), plan(alg=alg), None)
    assert int(tokens[0, 0]) == 0
    np.testing.assert_allclose(float(confidence[0, 0]), value, rtol=1e-5)


def test_top_p_uses_dreams_rule_and_top_k_keeps_k():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
  # Mass ranked above: 0, .5, .8, .95 -> dropped where it exceeds top_p.
  kept = lambda x: np.isfinite(np.asarray(x)).tolist()  # noqa: E731
  nucleus = sampler_lib.top_p_top_k_filter
  assert kept(nucleus(logits, 0.6)) == [True, True, False, False]
  assert kept(nucleus(logits, 0.5)) == [True, True, False, False]
  assert kept(nucleus(logits, 0.1)) == [True, False, False, False]
  assert kept(nucleus(logits, 1.0)) == [True] * 4
  assert kept(nucleus(jnp.asarray([1.0, 4.0, 2.0, 3.0]), top_k=2)) == [False, True, False, True]
  # Together: the shorter prefix wins, whichever it is; the nucleus is measured on the whole
  # distribution even when only the top k are ranked.
  assert kept(nucleus(logits, 0.9, top_k=2)) == [True, True, False, False]
  assert kept(nucleus(logits, 0.6, top_k=3)) == [True, True, False, False]
  assert kept(nucleus(logits, 0.9, top_k=3)) == [True, True, True, False]
  # Greedy with top_p: the confidence comes from the renormalised nucleus (.5 / .8).
  _, confidence = sampler_lib.choose_tokens(logits_for([0.5, 0.3, 0.15, 0.05]), masked_canvas(),
                                            plan(top_p=0.6), None)
  np.testing.assert_allclose(float(confidence[0, 0]), 0.5 / 0.8, rtol=1e-5)


def test_temperature_samples_and_the_confidence_is_the_sampled_tokens_probability():
  logits = jnp.broadcast_to(logits_for([0.64, 0.36]), (1, 4000, MODEL_ROWS))
  canvas = masked_canvas(4000)
  keys = jax.random.split(jax.random.key(0), 1)
  # Temperature 2 flattens 0.64 / 0.36 to 0.571 / 0.429 (square roots, renormalised).
  tokens, confidence = sampler_lib.choose_tokens(logits, canvas, plan(temperature=2.0), keys)
  tokens, confidence = np.asarray(tokens[0]), np.asarray(confidence[0])
  assert set(tokens.tolist()) == {0, 1}
  assert abs((tokens == 0).mean() - 0.8 / 1.4) < 0.03
  np.testing.assert_allclose(confidence[tokens == 0], 0.8 / 1.4, rtol=1e-4)
  np.testing.assert_allclose(confidence[tokens == 1], 0.6 / 1.4, rtol=1e-4)


def test_ctrl_penalties():
  np.testing.assert_allclose(sampler_lib.ctrl_scale(jnp.asarray([-2.0, 3.0, 0.0]), 2.0),
                             [-4.0, 1.5, 0.0])
  # Repetition: ids present in the canvas are penalised, the mask id is not an id present.
  logits = np.full((1, 2, MODEL_ROWS), -30.0, np.float32)
  logits[0, :, 5], logits[0, :, 6] = 2.0, 1.5
  canvas = jnp.asarray([[5, VOCAB.mask_id]])
  tokens, _ = sampler_lib.choose_tokens(jnp.asarray(logits), canvas, plan(repeat_penalty=1.5),
                                        None)
  assert int(tokens[0, 1]) == 6  # 2.0 / 1.5 < 1.5
  logits[0, :, 5], logits[0, :, 6] = -1.0, -1.2  # negative: -1.0 * 1.5 < -1.2
  tokens, _ = sampler_lib.choose_tokens(jnp.asarray(logits), canvas, plan(repeat_penalty=1.5),
                                        None)
  assert int(tokens[0, 1]) == 6
  tokens, _ = sampler_lib.choose_tokens(jnp.asarray(logits), masked_canvas(2),
                                        plan(repeat_penalty=1.5), None)
  assert int(tokens[0, 1]) == 5  # nothing decoded yet: nothing penalised
  # Position: ranks 0..99 free, then a ramp to gamma over the remaining masked positions.
  masked = jnp.ones((1, 150), bool).at[0, 10].set(False)  # 149 masked
  factors = np.asarray(sampler_lib.position_factors(masked, 2.0))[0]
  assert (factors[:101] == 1).all()  # position 10 is not masked, so rank 100 is position 101
  np.testing.assert_allclose(factors[102], 1 + 1 / 49)
  np.testing.assert_allclose(factors[149], 1 + 48 / 49)
  assert (np.asarray(sampler_lib.position_factors(jnp.ones((1, 100), bool), 2.0)) == 1).all()


class Constant(nnx.Module):
  """The same logits at every position: `<|begin_of_audio|>` 2.0, token 7 1.5, the rest -30."""

  def __init__(self):
    self.config = FakeConfig()
    logits = np.full(MODEL_ROWS, -30.0, np.float32)
    logits[VOCAB.begin_audio_id], logits[7] = 2.0, 1.5
    self.logits = nnx.Param(jnp.asarray(logits))

  def __call__(self, input_ids, segment_ids, positions):
    return jnp.broadcast_to(self.logits[...], input_ids.shape + (MODEL_ROWS,))


def test_a_prefilled_token_is_penalised_from_the_second_step():
  # Step 0 (no previous canvas): <|begin_of_audio|> still wins at the first masked position.
  # Step 1: it is in the canvas, 2.0 / 1.5 < 1.5, so token 7 wins.
  boa = VOCAB.begin_audio_id
  out = sample(Constant(), VOCAB, [prompt(3)], canvas=3, steps=3, repeat_penalty=1.5,
               prefill={1: boa})[0]
  np.testing.assert_array_equal(out, [boa, boa, 7])


# --- classifier-free guidance ------------------------------------------------------------------

def test_cfg_aligns_the_unconditional_canvas_and_runs_one_batched_forward():
  model = TwoTables()
  FORWARD_SHAPES.clear()
  cond, uncond = [prompt(7, start=3), prompt(4, start=40)], [prompt(2, start=50), prompt(9, start=60)]
  canvas, w = 5, 1.5
  out = sample(model, VOCAB, cond, canvas=canvas, steps=1, cfg=w, uncond_prompts=uncond)
  assert [shape[0] for shape in FORWARD_SHAPES] == [4]  # cond and uncond rows together
  table_w, table_u = np.asarray(model.w[...]), np.asarray(model.u[...])
  for row in range(2):
    # Canvas index j is scored at (start + j - 1), canvas - j positions before the row's end.
    distance = canvas - np.arange(canvas)
    c = table_w[distance] + table_u[cond[row][0]]
    u = table_w[distance] + table_u[uncond[row][0]]
    guided = u + (w + 1) * (c - u)
    guided[:, VOCAB.size:] = -np.inf
    guided[:, VOCAB.mask_id] = -np.inf
    np.testing.assert_array_equal(out[row], guided.argmax(-1))
  with pytest.raises(ValueError, match="uncond_prompts"):
    sample(model, VOCAB, cond, canvas=canvas, steps=1, cfg=w)


# --- a real model: batches, rows, mesh ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
  config = load_config("tests/train/tiny_experiment.yaml").model
  # A larger init spreads the logits, so confidences are far apart (no near ties); the toy
  # recipe's query/key norms would take the spread out of the attention logits again.
  config = dataclasses.replace(config, init_std=0.5, qk_norm=False)
  return config, create_model(config, seed=0), config.vocab.build()


def reference_decode(model, vocab, prompt_ids, canvas, steps, alg="maskgit_plus",
                     repeat_penalty=1.0, prefill=None, penalty_from=1):
  """One row, exact length, a Python loop: the release's algorithm (greedy; maskgit_plus, or
  entropy with its repetition penalty, which starts at step `penalty_from`: the release's 1,
  when there is a previous canvas, `len(histories) != 0` in its `_sample`)."""
  x = np.concatenate([prompt_ids, np.full(canvas, vocab.mask_id)]).astype(np.int32)
  start = len(prompt_ids)
  for offset, token in (prefill or {}).items():
    x[start + offset] = token
  ts = np.linspace(1, 1e-3, steps + 1, dtype=np.float32)
  forward = jax.jit(lambda ids: model(ids))
  for i in range(steps):
    logits = np.array(forward(jnp.asarray(x[None])), np.float32)[0, start - 1:-1]
    logits[:, vocab.size:] = -np.inf
    logits[:, vocab.mask_id] = -np.inf
    if repeat_penalty != 1 and i >= penalty_from:
      for token in set(x[start:].tolist()) - {vocab.mask_id}:
        column = logits[:, token]
        logits[:, token] = np.where(column < 0, column * repeat_penalty, column / repeat_penalty)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    masked = x[start:] == vocab.mask_id
    if not masked.any():
      break
    m = int(masked.sum())
    k = m if i == steps - 1 else max(1, int(np.floor(m * (1 - ts[i + 1] / ts[i]))))
    score = (probs.max(-1) if alg == "maskgit_plus" else
             np.sum(probs * np.log(probs + 1e-10), axis=-1))
    confidence = np.where(masked, score, -np.inf)
    chosen = np.argsort(-confidence, kind="stable")[:k]
    x[start + chosen] = probs.argmax(-1)[chosen]
  return x[start:]


def test_mixed_prompt_lengths_match_a_row_by_row_reference_and_rows_are_independent(tiny):
  _, model, vocab = tiny
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, vocab.text_size, n).astype(np.int32) for n in (3, 17, 9)]
  batch = sample(model, vocab, prompts, canvas=12, steps=5)
  for row, prompt_ids in enumerate(prompts):
    np.testing.assert_array_equal(batch[row], reference_decode(model, vocab, prompt_ids, 12, 5))
    alone = sample(model, vocab, [prompt_ids], canvas=12, steps=5)[0]
    np.testing.assert_array_equal(alone, batch[row])
  # With CFG, penalties and top-p too: a row alone and in a batch decode identically.
  settings = dict(canvas=12, steps=6, alg="entropy", repeat_penalty=1.3, top_p=0.9, cfg=1.0)
  uncond = [p[:2] for p in prompts]
  batch = sample(model, vocab, prompts, uncond_prompts=uncond, **settings)
  alone = sample(model, vocab, prompts[1:2], uncond_prompts=uncond[1:2], **settings)[0]
  np.testing.assert_array_equal(alone, batch[1])


def test_repetition_penalty_starts_at_the_second_step_like_the_release(tiny):
  _, model, vocab = tiny
  rng = np.random.default_rng(2)
  prompt_ids = rng.integers(0, vocab.text_size, 9).astype(np.int32)
  # A prefilled token (as <|begin_of_audio|> for svqa) is in the canvas before the first step.
  # A factor below 1 favours the tokens present, so applying it from the first step visibly
  # decodes something else; the loop only proves that for the token it picks.
  for token in reference_decode(model, vocab, prompt_ids, 12, 6, alg="entropy"):
    settings = dict(canvas=12, steps=6, alg="entropy", repeat_penalty=0.25,
                    prefill={5: int(token)})
    release = reference_decode(model, vocab, prompt_ids, **settings)
    if not np.array_equal(release, reference_decode(model, vocab, prompt_ids, **settings,
                                                    penalty_from=0)):
      break
  else:
    pytest.fail("no prefilled token tells the two rules apart")
  np.testing.assert_array_equal(sample(model, vocab, [prompt_ids], **settings)[0], release)


def test_runs_sharded_on_a_mesh_with_the_same_tokens(tiny):
  config, model, vocab = tiny
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = create_model(config, mesh, seed=0)
  prompts = [np.arange(1, n + 1, dtype=np.int32) for n in (4, 11, 6)]  # 3 rows on 4 shards
  expected = sample(model, vocab, prompts, canvas=10, steps=4, alg="topk_margin")
  got = sample(sharded, vocab, prompts, canvas=10, steps=4, alg="topk_margin")
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)
  # The dual cache's window, at a different column in each row, on the sharded cache.
  dual = dict(canvas=10, steps=6, block_size=4, cache="dual")
  for a, b in zip(sample(model, vocab, prompts, **dual), sample(sharded, vocab, prompts, **dual)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cache_refreshed_every_step_equals_no_cache(tiny, cache):
  _, model, vocab = tiny
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, vocab.text_size, n).astype(np.int32) for n in (3, 17, 9)]
  uncond = [p[:2] for p in prompts]
  for settings in (dict(canvas=12, steps=6),
                   dict(canvas=12, steps=8, block_size=5),  # blocks 5, 5 and a shorter 2
                   dict(canvas=12, steps=8, block_size=4, threshold=0.3),
                   dict(canvas=12, steps=6, block_size=6, cfg=1.0),
                   dict(canvas=12, steps=8, alg="entropy", block_size=4, cfg=1.0,
                        repeat_penalty=1.3, threshold=0.3)):
    uncached = sample_with_stats(model, vocab, prompts, uncond_prompts=uncond, **settings)
    cached = sample_with_stats(model, vocab, prompts, uncond_prompts=uncond, cache=cache,
                               cache_refresh=1, **settings)
    for a, b in zip(uncached.canvases, cached.canvases):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(uncached.forward_passes, cached.forward_passes)
    np.testing.assert_array_equal(cached.whole_row_passes, cached.forward_passes)
    np.testing.assert_array_equal(uncached.whole_row_passes, uncached.forward_passes)


def _cached_step_logits(model, vocab, prompts, canvas, settings, block):
  """(whole rows' canvas logits filling the cache, `_canvas_logits` of a cached step at `block`
  on the rows with `canvas` (callable: canvas -> logits), the window's first canvas position)."""
  rows = sampler_lib.DecodeRows.build(model, vocab, prompts, settings, None)
  plan = sampler_lib.Plan.of(settings, vocab)
  start, _ = plan.blocks[block]
  window_start = min(start, settings.canvas - plan.window)
  positions = jnp.broadcast_to(jnp.arange(rows.tokens.shape[1]), rows.tokens.shape)

  def logits(canvas, cache, step):
    tokens = rows.tokens.copy()
    for row, row_start in enumerate(rows.starts):
      tokens[row, row_start:row_start + settings.canvas] = canvas[row]
    return sampler_lib._canvas_logits(
        model, jnp.asarray(tokens), jnp.asarray(rows.segment_ids), positions,
        jnp.asarray(rows.starts), jnp.arange(settings.canvas), cache, jnp.int32(step),
        jnp.int32(window_start), plan)

  whole, cache, refreshed = logits(canvas, model.init_cache(*rows.tokens.shape), 0)
  assert refreshed  # a block's first step fills the cache
  return whole, (lambda other: logits(other, cache, 1)), window_start


def test_a_cached_step_on_the_canvas_the_cache_was_filled_with_equals_the_whole_rows(tiny):
  # The canvas-only forward (the prompt's last token and the canvas against the prompt's cached
  # keys and values) scores the canvas as the whole rows do, when nothing changed in between.
  _, model, vocab = tiny
  rng = np.random.default_rng(7)
  prompts = [rng.integers(0, vocab.text_size, n).astype(np.int32) for n in (3, 17, 9)]
  settings = DecodeSettings(canvas=10, steps=4, cache="prefix")
  canvas = rng.integers(0, vocab.size, (3, 10)).astype(np.int32)
  whole, cached_step, _ = _cached_step_logits(model, vocab, prompts, canvas, settings, 0)
  cached, _, refreshed = cached_step(canvas)
  assert not refreshed
  np.testing.assert_allclose(cached, whole, atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.argmax(cached, -1), np.argmax(whole, -1))


@pytest.mark.parametrize("block", [0, 1, 2])  # first, middle, last (shorter, window clamped)
def test_a_dual_cached_step_runs_the_block_against_every_other_column_cached(tiny, block):
  # canvas 10 in blocks of 4: (0, 4), (4, 8), (8, 10); the window is 4 wide, the last one
  # starts at 6. Between refreshes the window's logits come from its tokens, the token before it
  # (whose logits score the window's first position: a finished block's, unchanged) and the
  # cache alone: tokens changed elsewhere since the refresh leave them as the whole rows scored
  # them then, and positions outside the window are never scored.
  _, model, vocab = tiny
  rng = np.random.default_rng(8)
  prompts = [rng.integers(0, vocab.text_size, n).astype(np.int32) for n in (3, 17, 9)]
  settings = DecodeSettings(canvas=10, steps=10, block_size=4, cache="dual")
  canvas = rng.integers(0, vocab.size, (3, 10)).astype(np.int32)
  whole, cached_step, window_start = _cached_step_logits(model, vocab, prompts, canvas,
                                                         settings, block)
  assert window_start == (0, 4, 6)[block]
  window = slice(window_start, window_start + 4)
  changed_outside = rng.integers(0, vocab.size, (3, 10)).astype(np.int32)
  kept = slice(max(window_start - 1, 0), window_start + 4)
  changed_outside[:, kept] = canvas[:, kept]
  cached, _, refreshed = cached_step(changed_outside)
  assert not refreshed
  np.testing.assert_allclose(cached[:, window], whole[:, window], atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(cached)[:, :window_start], 0)
  np.testing.assert_array_equal(np.asarray(cached)[:, window_start + 4:], 0)
  # A token changed inside the window does change the window's logits (it runs fresh).
  changed_inside = canvas.copy()
  changed_inside[:, window_start + 1] = (canvas[:, window_start + 1] + 1) % vocab.text_size
  assert not np.allclose(cached_step(changed_inside)[0][:, window], whole[:, window], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cache_between_refreshes_keeps_rows_independent(tiny, cache):
  _, model, vocab = tiny
  rng = np.random.default_rng(6)
  prompts = [rng.integers(0, vocab.text_size, n).astype(np.int32) for n in (3, 17, 9)]
  uncond = [p[:2] for p in prompts]
  for settings in (dict(canvas=12, steps=12, block_size=6, cache=cache),
                   dict(canvas=12, steps=8, block_size=4, cache=cache, cfg=1.0, threshold=0.3,
                        repeat_penalty=1.3)):
    batch = sample(model, vocab, prompts, uncond_prompts=uncond, **settings)
    for row in range(3):
      alone = sample(model, vocab, prompts[row:row + 1], uncond_prompts=uncond[row:row + 1],
                     **settings)[0]
      np.testing.assert_array_equal(alone, batch[row])
  # The steps between refreshes read stale keys: on this random model some token differs from
  # the uncached decode (were every step a refresh, none would).
  uncached = sample(model, vocab, prompts, canvas=12, steps=12, block_size=6)
  assert any((a != b).any() for a, b in zip(
      sample(model, vocab, prompts, canvas=12, steps=12, block_size=6, cache=cache), uncached))


def test_dual_cache_reads_the_other_blocks_stale_and_refreshes_as_told(tiny):
  _, model, vocab = tiny
  rng = np.random.default_rng(9)
  prompts = [rng.integers(0, vocab.text_size, n).astype(np.int32) for n in (3, 17, 9)]
  settings = dict(canvas=12, steps=12, block_size=4)  # 3 blocks of 4 steps, one token a step
  prefix = sample_with_stats(model, vocab, prompts, cache="prefix", **settings)
  dual = sample_with_stats(model, vocab, prompts, cache="dual", **settings)
  # Between refreshes only the current block's tokens change; the prefix cache recomputes the
  # other blocks' keys and values (which attend to them), the dual cache keeps the refresh's.
  assert any((a != b).any() for a, b in zip(prefix.canvases, dual.canvases))
  np.testing.assert_array_equal(dual.forward_passes, 12)
  np.testing.assert_array_equal(dual.whole_row_passes, 3)  # each block's first step
  every_other = sample_with_stats(model, vocab, prompts, cache="dual", cache_refresh=2,
                                  **settings)
  np.testing.assert_array_equal(every_other.whole_row_passes, 6)  # local steps 0 and 2


def test_bad_arguments_fail_with_one_clear_message(tiny):
  _, model, vocab = tiny
  with pytest.raises(ValueError, match="alg='greedy' is not one of"):
    sample(model, vocab, [prompt(3)], canvas=4, steps=2, alg="greedy")
  with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty"):
    sample(model, vocab, [prompt(3), np.zeros(0, np.int32)], canvas=4, steps=2)
  with pytest.raises(ValueError, match=r"prompts\[0\]: token id 5000"):
    sample(model, vocab, [np.asarray([1, 5000])], canvas=4, steps=2)
  assert sample(model, vocab, [], canvas=4, steps=2) == []


# --- post-processing ----------------------------------------------------------------------------

def test_trim_split_and_image_grid():
  v = VOCAB
  ids = np.asarray([5, 6, v.begin_image_id, v.image_offset + 3, v.image_offset + 7,
                    v.end_image_id, v.speech_offset + 2, v.im_end_id, 9, v.pad_id])
  np.testing.assert_array_equal(trim(ids, v), ids[:7])
  np.testing.assert_array_equal(trim(np.asarray([5, v.pad_id, 6]), v), [5])
  parts = split_modalities(trim(ids, v), v)
  np.testing.assert_array_equal(parts.text, [5, 6])
  np.testing.assert_array_equal(parts.image, [3, 7])
  np.testing.assert_array_equal(parts.speech, [2])
  np.testing.assert_array_equal(image_grid([3, 7], 4, 16), [3, 7, 7, 7])  # repeat the last
  np.testing.assert_array_equal(image_grid([1, 2, 3, 4, 5], 4, 16), [1, 2, 3, 4])
  np.testing.assert_array_equal(image_grid([], 2, 16), [0, 0])
  np.testing.assert_array_equal(image_grid([20, -1], 2, 16), [15, 0])


def test_spoken_answer_splits_at_the_prefilled_begin_of_audio():
  v = VOCAB
  speech = [v.speech_offset + 4, v.speech_offset + 5]
  canvas = np.asarray([v.pad_id, 7, 8, v.pad_id, v.begin_audio_id, *speech, v.end_audio_id,
                       v.im_end_id, v.pad_id])
  text, spoken = spoken_answer(canvas, v)
  np.testing.assert_array_equal(split_modalities(text, v).text, [7, 8])  # filler dropped
  np.testing.assert_array_equal(split_modalities(spoken, v).speech, [4, 5])
  text, spoken = spoken_answer(np.asarray([7, v.im_end_id, 9]), v)  # no speech at all
  np.testing.assert_array_equal(text, [7])
  assert len(spoken) == 0
