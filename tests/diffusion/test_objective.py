"""The objective: who gets masked, how often, determinism, and the shifted cross-entropy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.config import CONFIG_ROOT, ObjectiveConfig, load_config
from omnijax.data.tasks import TASKS
from omnijax.diffusion import objective
from omnijax.diffusion.cross_entropy import token_cross_entropy
from omnijax.model.build import create_model
from omnijax.model.rope import segment_positions
from omnijax.vocab import Vocab

VOCAB = Vocab.compact(100, n_image_codes=16, n_speech_codes=16)


def packed_batch(rows=64, length=96, seed=0):
  """Rows of 3 samples: prompt (8 text tokens), response (text), then 4 tail pads; padding tail."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 100, (rows, length)).astype(np.int32)
  segment_ids = np.zeros((rows, length), np.int32)
  response = np.zeros((rows, length), np.int32)
  task_ids = np.full((rows, length), -1, np.int32)
  for r in range(rows):
    start = 0
    for s in range(1, 4):
      size = 28
      segment_ids[r, start:start + size] = s
      response[r, start + 8:start + size] = 1
      tokens[r, start + size - 4:start + size] = VOCAB.pad_id
      task_ids[r, start:start + size] = s - 1
      start += size
  positions = np.zeros_like(segment_ids)
  return {k: jnp.asarray(v) for k, v in dict(tokens=tokens, segment_ids=segment_ids,
                                               positions=positions, response_mask=response,
                                               task_ids=task_ids).items()}


def test_omni_masks_only_response_tokens_at_the_published_rates():
  batch = packed_batch()
  c = objective.corrupt(batch, ObjectiveConfig(), VOCAB, seed=0, step=jnp.int32(0))
  masked = np.asarray(c.masked)
  response = np.asarray(batch["response_mask"]) > 0
  assert not masked[~response].any()  # prompts and padding are never masked
  is_pad = np.asarray(batch["tokens"]) == VOCAB.pad_id
  normal_rate = masked[response & ~is_pad].mean()
  pad_rate = masked[response & is_pad].mean()
  # E[thr] = 0.5005 for normal tokens and 0.6 x that for tail pads (reference §3).
  assert abs(normal_rate - 0.5005) < 0.02
  assert abs(pad_rate - 0.3003) < 0.03
  inputs = np.asarray(c.inputs)
  assert (inputs[masked] == VOCAB.mask_id).all()
  np.testing.assert_array_equal(inputs[~masked], np.asarray(batch["tokens"])[~masked])
  assert (np.asarray(c.weights)[masked] == 1.0).all()


def test_every_sample_gets_at_least_one_target():
  batch = packed_batch(rows=32)
  # One-token responses: without the guarantee about half the samples would have no target.
  response = np.zeros((32, 96), np.int32)
  response[:, [10, 38, 66]] = 1
  batch = dict(batch, response_mask=jnp.asarray(response))
  c = objective.corrupt(batch, ObjectiveConfig(), VOCAB, seed=1, step=jnp.int32(3))
  np.testing.assert_array_equal(np.asarray(c.masked)[:, [10, 38, 66]], True)
  assert np.asarray(c.masked).sum() == 32 * 3


def test_masks_are_a_function_of_seed_step_and_global_row():
  batch = packed_batch(rows=8)
  config = ObjectiveConfig()
  whole = objective.corrupt(batch, config, VOCAB, seed=5, step=jnp.int32(7)).masked
  upper = objective.corrupt(jax.tree.map(lambda x: x[4:], batch), config, VOCAB, seed=5,
                            step=jnp.int32(7), row_offset=4).masked
  np.testing.assert_array_equal(whole[4:], upper)
  other_step = objective.corrupt(batch, config, VOCAB, seed=5, step=jnp.int32(8)).masked
  other_seed = objective.corrupt(batch, config, VOCAB, seed=6, step=jnp.int32(7)).masked
  assert (np.asarray(whole) != np.asarray(other_step)).any()
  assert (np.asarray(whole) != np.asarray(other_seed)).any()


def test_llada_shares_one_threshold_per_sample_and_weights_by_its_inverse():
  batch = packed_batch(rows=16)
  c = objective.corrupt(batch, ObjectiveConfig(kind="llada"), VOCAB, seed=0, step=jnp.int32(0))
  weights, masked = np.asarray(c.weights), np.asarray(c.masked)
  seg = np.asarray(batch["segment_ids"])
  per_sample_rates = []
  for r in range(16):
    for s in (1, 2, 3):
      w = weights[r][(seg[r] == s) & masked[r]]
      assert len(w) >= 1 and np.allclose(w, w[0])  # one t per sample
      assert w[0] >= 1.0
      per_sample_rates.append(masked[r][(seg[r] == s) & (np.asarray(batch["response_mask"])[r] > 0)]
                              .mean())
  # One t per sample spreads the masked fraction over (0, 1), unlike per-token thresholds.
  assert np.std(per_sample_rates) > 0.15


def test_loss_is_the_shifted_cross_entropy_over_targets():
  batch = packed_batch(rows=4, length=96)
  config = ObjectiveConfig(vocab_chunks=4)  # 177 ids: 4 chunks of 45, the last 3 columns padding
  c = objective.corrupt(batch, config, VOCAB, seed=0, step=jnp.int32(0))
  hidden = jax.random.normal(jax.random.key(0), (4, 96, 16))
  head = jax.random.normal(jax.random.key(1), (16, VOCAB.size))
  sums = objective.loss_sums(hidden, head, batch, c, config)
  tokens, masked = np.asarray(batch["tokens"]), np.asarray(c.masked)
  log_probs = np.asarray(jax.nn.log_softmax(hidden @ head, axis=-1))
  expected = [-log_probs[b, j - 1, tokens[b, j]] for b, j in zip(*np.nonzero(masked))]
  assert sums["targets"] == len(expected) == sums["denominator"]
  np.testing.assert_allclose(sums["loss_sum"] / sums["targets"], np.mean(expected), rtol=1e-5)
  task_ids = np.asarray(batch["task_ids"])
  for task in range(3):
    chosen = [-log_probs[b, j - 1, tokens[b, j]] for b, j in zip(*np.nonzero(masked))
              if task_ids[b, j] == task]
    np.testing.assert_allclose(sums["task_loss_sum"][task] / sums["task_targets"][task],
                               np.mean(chosen), rtol=1e-5)
  assert float(sums["task_targets"][len(TASKS) - 1]) == 0


def full_logits_loss_sum(hidden, head, batch, corruption):
  """The loss as it was computed before chunking: all [B, L, V] fp32 logits at once."""
  logits = (hidden @ head)[:, :-1].astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  ce = jnp.where(corruption.masked[:, 1:], log_z - target_logit, 0.0)
  return jnp.sum(ce * corruption.weights[:, 1:])


@pytest.mark.parametrize("kind,chunks", [("omni", 1), ("omni", 3), ("omni", 7), ("llada", 4)])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(kind, chunks):
  batch = packed_batch(rows=4, length=96, seed=3)
  config = ObjectiveConfig(kind=kind, vocab_chunks=chunks)
  c = objective.corrupt(batch, config, VOCAB, seed=2, step=jnp.int32(1))
  hidden = jax.random.normal(jax.random.key(2), (4, 96, 24))
  head = 0.5 * jax.random.normal(jax.random.key(3), (24, VOCAB.size))
  chunked = lambda h, w: objective.loss_sums(h, w, batch, c, config)["loss_sum"]
  full = lambda h, w: full_logits_loss_sum(h, w, batch, c)
  loss, grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, head)
  reference_loss, reference_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, head)
  np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
  for grad, reference in zip(grads, reference_grads):
    np.testing.assert_allclose(grad, reference, atol=1e-5, rtol=1e-5)
  # Positions that are not targets (prompts, padding, the last one) get no gradient.
  scored = np.asarray(c.masked)[:, 1:]
  assert not np.asarray(grads[0])[:, :-1][~scored].any() and not np.asarray(grads[0])[:, -1].any()


def test_chunked_loss_never_holds_the_full_logits():
  rows, length, width, vocab = 2, 1024, 64, 8192
  hidden = jax.ShapeDtypeStruct((rows, length, width), jnp.float32)
  head = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
  targets = jax.ShapeDtypeStruct((rows, length), jnp.int32)

  def temp_bytes(chunks):
    loss = lambda h, w, t: token_cross_entropy(h, w, t, chunks).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_logits = rows * length * vocab * 4  # 64 MiB
  assert temp_bytes(1) >= full_logits
  assert temp_bytes(16) < full_logits / 4


def test_objective_config_is_validated():
  from omnijax.config import ConfigError
  with pytest.raises(ConfigError, match="train.objective.kind='mdlm'"):
    ObjectiveConfig(kind="mdlm")
  with pytest.raises(ConfigError, match="train.objective.vocab_chunks=0"):
    ObjectiveConfig(vocab_chunks=0)
  assert dataclasses.replace(ObjectiveConfig(), pad_mask_ratio=1.0).pad_mask_ratio == 1.0


def test_objectives_are_chosen_by_name_and_an_unknown_kind_is_refused_naming_the_key():
  from omnijax.config import OBJECTIVE_KINDS, ConfigError
  assert tuple(objective.OBJECTIVES) == OBJECTIVE_KINDS
  for kind in OBJECTIVE_KINDS:
    chosen = objective.get_objective(kind)
    assert chosen.name == kind and isinstance(chosen, objective.Objective)
    # The diffusion objectives attend bidirectionally, the autoregressive one causally.
    assert chosen.causal == (kind == "ar")
  message = r"train.objective.kind='mdlm': expected one of omni, llada, ar"
  with pytest.raises(ConfigError, match=message):
    objective.get_objective("mdlm")
  with pytest.raises(ConfigError, match=message):
    ObjectiveConfig(kind="mdlm")


TINY_MODEL = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model


def tiny_ar_batch():
  """Two rows: [prompt 4, response 5 (2 tail pads)] [prompt 3, response 4] padding, and one
  sample of prompt 5 + response 6 filling its row."""
  vocab = TINY_MODEL.vocab.build()
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, vocab.text_size, (2, 16)).astype(np.int32)
  segment_ids = np.array([[1] * 9 + [2] * 7, [1] * 11 + [0] * 5], np.int32)
  response = np.zeros((2, 16), np.int32)
  response[0, 4:9] = response[0, 12:16] = response[1, 5:11] = 1
  tokens[0, 7:9] = vocab.pad_id
  tokens[1, 11:] = vocab.pad_id
  task_ids = np.where(segment_ids > 0, 0, -1).astype(np.int32)
  batch = dict(tokens=tokens, segment_ids=segment_ids, response_mask=response, task_ids=task_ids,
               positions=np.asarray(segment_positions(jnp.asarray(segment_ids))))
  return {k: jnp.asarray(v) for k, v in batch.items()}, vocab


def ar_loss(model, batch, vocab, before_column=None):
  """The AR objective's loss as the train step computes it (inputs, causal hidden states,
  shifted CE, denominator), over the targets left of `before_column` when given."""
  config = ObjectiveConfig(kind="ar", vocab_chunks=3)
  ar = objective.get_objective("ar")
  c = objective.corrupt(batch, config, vocab, seed=0, step=jnp.int32(0))
  if before_column is not None:
    kept = jnp.arange(c.masked.shape[1]) < before_column
    c = dataclasses.replace(c, masked=c.masked & kept, weights=jnp.where(kept, c.weights, 0.0))
  hidden = model.hidden_states(c.inputs, batch["segment_ids"], batch["positions"],
                               causal=ar.causal)
  sums = objective.loss_sums(hidden, model.output_head(), batch, c, config)
  return float(sums["loss_sum"] / sums["denominator"]), c, sums


def test_ar_loss_is_the_next_token_cross_entropy_of_each_sample_run_alone():
  batch, vocab = tiny_ar_batch()
  model = create_model(TINY_MODEL, seed=3)
  loss, c, sums = ar_loss(model, batch, vocab)
  # Nothing is masked, every response token (tail pads included) is a target of weight 1.
  np.testing.assert_array_equal(c.inputs, batch["tokens"])
  np.testing.assert_array_equal(c.masked, batch["response_mask"] > 0)
  assert float(sums["denominator"]) == float(sums["targets"]) == 15
  # By hand: -log p(x_j | the sample's tokens before j), each prefix run alone (one row each,
  # right-padded) through the causal model, the logits at its last token.
  tokens, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  targets = list(zip(*np.nonzero(np.asarray(batch["response_mask"]))))
  prefixes = np.zeros((len(targets), 16), np.int32)
  prefix_segments = np.zeros((len(targets), 16), np.int32)
  for index, (row, column) in enumerate(targets):
    start = np.flatnonzero(segments[row] == segments[row, column])[0]
    prefixes[index, :column - start] = tokens[row, start:column]
    prefix_segments[index, :column - start] = 1
  logits = np.asarray(model(jnp.asarray(prefixes), jnp.asarray(prefix_segments), causal=True),
                      np.float64)
  expected = [jax.nn.logsumexp(logits[index, n - 1]) - logits[index, n - 1, tokens[row, column]]
              for index, ((row, column), n) in enumerate(zip(targets, prefix_segments.sum(1)))]
  assert len(expected) == 15
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)


def test_ar_losses_do_not_depend_on_later_tokens():
  batch, vocab = tiny_ar_batch()
  model = create_model(TINY_MODEL, seed=4)
  changed_column = 6  # a response token of row 0's first sample
  tokens = np.asarray(batch["tokens"]).copy()
  tokens[0, changed_column] = (tokens[0, changed_column] + 1) % vocab.text_size
  perturbed = dict(batch, tokens=jnp.asarray(tokens))
  # The targets left of the change keep their loss exactly; the sample's later ones do not.
  assert (ar_loss(model, perturbed, vocab, changed_column)[0] ==
          ar_loss(model, batch, vocab, changed_column)[0])
  assert abs(ar_loss(model, perturbed, vocab)[0] - ar_loss(model, batch, vocab)[0]) > 1e-4


def test_ar_never_targets_a_sample_s_first_token():
  # Predicting it would read the previous sample's last hidden state: not a next-token loss.
  batch, vocab = tiny_ar_batch()
  response = np.asarray(batch["response_mask"]).copy()
  response[0, 9] = response[0, 0] = 1  # first tokens of row 0's two samples
  c = objective.corrupt(dict(batch, response_mask=jnp.asarray(response)),
                        ObjectiveConfig(kind="ar"), vocab, seed=0, step=jnp.int32(0))
  np.testing.assert_array_equal(c.masked, batch["response_mask"] > 0)


@pytest.mark.parametrize("kind", ["omni", "llada", "ar"])
def test_sample_average_weighs_every_sample_the_same_whatever_its_response_length(kind):
  """`average: samples`: the loss is the mean over packed samples of each one's weighted CE
  summed over its targets and divided by its response length (LLaDA's SFT estimator), computed
  here sample by sample; `tokens` divides by the objective's own denominator instead."""
  batch = dict(packed_batch(rows=4, length=96))
  response = np.asarray(batch["response_mask"]).copy()
  response[:, 8 + 2:28] = 0  # the first sample of each row answers in 2 tokens, the others in 20
  batch["response_mask"] = jnp.asarray(response)
  config = ObjectiveConfig(kind=kind, vocab_chunks=1, average="samples")
  c = objective.corrupt(batch, config, VOCAB, seed=0, step=jnp.int32(3))
  hidden = jax.random.normal(jax.random.key(0), (4, 96, 16))
  head = jax.random.normal(jax.random.key(1), (16, VOCAB.size))
  sums = objective.loss_sums(hidden, head, batch, c, config)
  tokens, masked, weights = np.asarray(batch["tokens"]), np.asarray(c.masked), np.asarray(c.weights)
  log_probs = np.asarray(jax.nn.log_softmax(hidden @ head, axis=-1))
  segments = np.asarray(batch["segment_ids"])
  per_sample = []
  for b in range(4):
    for s in (1, 2, 3):
      where = (segments[b] == s) & masked[b]
      ce = sum(-log_probs[b, j - 1, tokens[b, j]] * weights[b, j] for j in np.flatnonzero(where))
      per_sample.append(ce / ((segments[b] == s) & (response[b] > 0)).sum())
  assert float(sums["denominator"]) == pytest.approx(12)
  np.testing.assert_allclose(sums["loss_sum"] / sums["denominator"], np.mean(per_sample),
                             rtol=1e-5)
  tokens_config = dataclasses.replace(config, average="tokens")
  by_token = objective.loss_sums(hidden, head, batch, c, tokens_config)
  assert float(by_token["denominator"]) != pytest.approx(12)
  with pytest.raises(Exception, match="train.objective.average='words'"):
    ObjectiveConfig(average="words")


@pytest.mark.parametrize("kind", ["omni", "llada"])
def test_cosine_schedule_draws_masking_levels_from_maskgit_s_distribution(kind):
  # P(t > x) = (2/pi) arccos(x) under t = cos(pi/2 r): 0.287 above 0.9 (uniform: 0.1),
  # and the mean level is 2/pi. llada: one level per sample, read back from its 1/t weight;
  # omni: one per token, seen through the masked fraction of the non-pad response tokens.
  batch = packed_batch(rows=256)
  tokens = np.asarray(batch["tokens"])
  response = (np.asarray(batch["response_mask"]) > 0) & (tokens != VOCAB.pad_id)
  levels = {}
  for schedule in ("uniform", "cosine"):
    config = ObjectiveConfig(kind=kind, mask_schedule=schedule)
    c = objective.corrupt(batch, config, VOCAB, seed=0, step=jnp.int32(0))
    if kind == "llada":
      weights, seg = np.asarray(c.weights), np.asarray(batch["segment_ids"])
      levels[schedule] = np.array([
          1.0 / weights[r][(seg[r] == s) & (weights[r] > 0)][0]
          for r in range(256) for s in (1, 2, 3)])
    else:
      levels[schedule] = np.asarray(c.masked)[response]
  if kind == "llada":
    assert abs((levels["cosine"] > 0.9).mean() - 2 / np.pi * np.arccos(0.9)) < 0.03
    assert abs((levels["uniform"] > 0.9).mean() - 0.1) < 0.03
  assert abs(levels["cosine"].mean() - 2 / np.pi) < 0.02
  assert abs(levels["uniform"].mean() - 0.5) < 0.02


def test_task_mask_schedules_draw_the_named_tasks_levels_from_their_own_schedule():
  # packed_batch's segments 1, 2, 3 are tasks 0, 1, 2 (t2i, caption, vqa): t2i's samples follow
  # cosine (mean level 2/pi), the others the default uniform (mean 1/2), in the same batch.
  batch = packed_batch(rows=256)
  config = ObjectiveConfig(kind="llada", task_mask_schedules={"t2i": "cosine"})
  c = objective.corrupt(batch, config, VOCAB, seed=0, step=jnp.int32(0))
  weights, seg = np.asarray(c.weights), np.asarray(batch["segment_ids"])
  levels = {s: np.array([1.0 / weights[r][(seg[r] == s) & (weights[r] > 0)][0] for r in range(256)])
            for s in (1, 2, 3)}
  assert abs(levels[1].mean() - 2 / np.pi) < 0.03
  assert abs((levels[1] > 0.9).mean() - 2 / np.pi * np.arccos(0.9)) < 0.05
  for s in (2, 3):
    assert abs(levels[s].mean() - 0.5) < 0.03
  # The same draws: a task's level is its schedule applied to the draw uniform would have used.
  uniform = objective.corrupt(batch, ObjectiveConfig(kind="llada"), VOCAB, seed=0,
                              step=jnp.int32(0))
  uniform_weights = np.asarray(uniform.weights)
  uniform_levels = np.array([1.0 / uniform_weights[r][(seg[r] == 1) & (uniform_weights[r] > 0)][0]
                             for r in range(256)])
  eps = config.eps
  draws = (uniform_levels - eps) / (1 - eps)
  np.testing.assert_allclose(levels[1], (1 - eps) * np.cos(np.pi / 2 * draws) + eps, atol=1e-4)


@pytest.mark.parametrize("average", ["tokens", "samples"])
def test_task_loss_weights_scale_only_the_named_tasks_terms(average):
  # packed_batch's segments 1, 2, 3 are t2i, caption, vqa. The loss is linear in each task's
  # factor: vqa at 3 adds twice vqa's own terms (read off with vqa at 0), the rest unchanged.
  batch = packed_batch(rows=4, length=96)
  hidden = jax.random.normal(jax.random.key(0), (4, 96, 16))
  head = jax.random.normal(jax.random.key(1), (16, VOCAB.size))

  def sums(weights):
    config = ObjectiveConfig(kind="llada", vocab_chunks=1, average=average,
                             task_loss_weights=weights)
    c = objective.corrupt(batch, config, VOCAB, seed=0, step=jnp.int32(0))
    return objective.loss_sums(hidden, head, batch, c, config)

  plain, without_vqa, vqa_tripled = sums({}), sums({"vqa": 0.0}), sums({"vqa": 3.0})
  vqa_terms = float(plain["loss_sum"] - without_vqa["loss_sum"])
  assert vqa_terms > 0
  np.testing.assert_allclose(float(vqa_tripled["loss_sum"]),
                             float(plain["loss_sum"]) + 2 * vqa_terms, rtol=1e-5)
  assert float(sums({"t2i": 1.0})["loss_sum"]) == float(plain["loss_sum"])
  for other in (without_vqa, vqa_tripled):
    assert float(other["denominator"]) == float(plain["denominator"])
    np.testing.assert_array_equal(other["task_loss_sum"], plain["task_loss_sum"])


def test_an_unknown_mask_schedule_is_refused_naming_the_key():
  from omnijax.config import ConfigError
  with pytest.raises(ConfigError, match="train.objective.mask_schedule='linear'"):
    ObjectiveConfig(mask_schedule="linear")
  with pytest.raises(ConfigError, match="train.objective.task_mask_schedules.s2i='linear'"):
    ObjectiveConfig(task_mask_schedules={"s2i": "linear"})
  with pytest.raises(ConfigError, match="train.objective.task_mask_schedules.img: unknown task"):
    ObjectiveConfig(task_mask_schedules={"img": "cosine"})
  with pytest.raises(ConfigError, match=r"train.objective.task_loss_weights.vqa=-1.0 must be >= 0"):
    ObjectiveConfig(task_loss_weights={"vqa": -1.0})
  with pytest.raises(ConfigError, match="train.objective.task_loss_weights.img: unknown task"):
    ObjectiveConfig(task_loss_weights={"img": 2.0})
