"""The objective: who gets masked, how often, determinism, and the shifted cross-entropy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.config import ObjectiveConfig
from omnijax.data.tasks import TASKS
from omnijax.diffusion import objective
from omnijax.diffusion.cross_entropy import token_cross_entropy
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
    assert not chosen.causal  # both diffusion objectives attend bidirectionally
  with pytest.raises(ConfigError, match=r"train.objective.kind='ar': expected one of omni, llada"):
    objective.get_objective("ar")
  with pytest.raises(ConfigError, match=r"train.objective.kind='ar': expected one of omni, llada"):
    ObjectiveConfig(kind="ar")
