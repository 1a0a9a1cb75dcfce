"""The backbone: bidirectional (and causal) segment masking, positions, padding, scan/remat
equivalence, and input embeddings in place of token embeddings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.config import CONFIG_ROOT, MeshConfig, load_config
from omnijax.kernels.reference import xla_attention
from omnijax.model.build import create_model
from omnijax.model.rope import segment_positions
from omnijax.sharding import make_mesh


def tiny(*overrides):
  return load_config(CONFIG_ROOT / "model" / "tiny.yaml", list(overrides)).model


def test_positions_restart_at_every_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(segment_positions(seg),
                                [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def test_attention_is_bidirectional_within_a_segment_and_blind_across():
  model = create_model(tiny(), seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, size=(1, 12))
  seg = jnp.array([[1] * 6 + [2] * 4 + [0] * 2])
  base = model(jnp.asarray(tokens), seg)
  # Changing the LAST token of segment 1 changes the FIRST position's logits (bidirectional) ...
  changed = tokens.copy()
  changed[0, 5] = (changed[0, 5] + 1) % 512
  out = model(jnp.asarray(changed), seg)
  assert np.abs(out[0, 0] - base[0, 0]).max() > 1e-4
  # ... but not segment 2's, and padding tokens are invisible to everyone.
  np.testing.assert_allclose(out[0, 6:10], base[0, 6:10], atol=1e-6)
  padded = tokens.copy()
  padded[0, 10:] = 7
  np.testing.assert_allclose(model(jnp.asarray(padded), seg)[0, :10], base[0, :10], atol=1e-6)
  assert np.isfinite(np.asarray(base)).all()


def test_packed_row_equals_separate_rows():
  model = create_model(tiny(), seed=1)
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, 512, size=7), rng.integers(0, 512, size=5)
  packed = model(jnp.asarray(np.concatenate([a, b]))[None], jnp.array([[1] * 7 + [2] * 5]))
  np.testing.assert_allclose(packed[0, :7], model(jnp.asarray(a)[None])[0], atol=2e-5)
  np.testing.assert_allclose(packed[0, 7:], model(jnp.asarray(b)[None])[0], atol=2e-5)


def test_fully_padded_rows_are_finite_and_attention_zero():
  q = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
  k = v = jax.random.normal(jax.random.key(1), (2, 6, 2, 8))
  seg = jnp.array([[1, 1, 0, 0, 0, 0], [0] * 6])
  out = xla_attention(q, k, v, seg)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(out[0, 2:], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  grads = jax.grad(lambda q: xla_attention(q, k, v, seg).sum())(q)
  assert np.isfinite(np.asarray(grads)).all()


def _unstacked_copy(stacked_model, config):
  """The same weights in the list-of-layers layout (scan_layers=false)."""
  listed = create_model(dataclasses.replace(config, scan_layers=False), seed=9)
  state = nnx.state(stacked_model)
  target = nnx.state(listed)
  for i in range(config.num_layers):
    layer = jax.tree.map(lambda x: x[i], state["layers"])
    target["layers"][i] = layer
  for key in ("embed_tokens", "norm", "lm_head"):
    target[key] = state[key]
  nnx.update(listed, target)
  return listed


@pytest.mark.parametrize("remat", ["none", "full", "save_dots", "save_dots_except_mlp",
                                   "save_attention_out"])
def test_scan_and_remat_do_not_change_values_or_grads(remat):
  config = tiny(f"model.remat={remat}")
  stacked = create_model(config, seed=4)
  listed = _unstacked_copy(stacked, config)
  tokens = jnp.arange(20).reshape(2, 10) % 512
  seg = jnp.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2])
  loss = lambda m: jnp.mean(m(tokens, seg) ** 2)
  np.testing.assert_allclose(stacked(tokens, seg), listed(tokens, seg), atol=1e-5)
  g_stacked = nnx.grad(loss)(stacked)
  g_listed = nnx.grad(loss)(listed)
  np.testing.assert_allclose(g_stacked["layers"]["mlp"]["down_proj"]["kernel"][...][1],
                             g_listed["layers"][1]["mlp"]["down_proj"]["kernel"][...], atol=1e-6)
  np.testing.assert_allclose(g_stacked["embed_tokens"][...], g_listed["embed_tokens"][...],
                             atol=1e-6)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
  config32, config16 = tiny(), tiny("model.compute_dtype=bfloat16")
  m32, m16 = create_model(config32, seed=2), create_model(config16, seed=2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16)))
  tokens = jnp.arange(16)[None] % 512
  out16 = m16(tokens)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), m32(tokens), atol=0.05)


def test_tied_embeddings_share_the_matrix():
  model = create_model(tiny("model.tie_embeddings=true"), seed=0)
  assert model.lm_head is None
  hidden = model.config.hidden_size
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  assert n == model.config.param_count()
  assert model.config.param_count() < create_model(tiny()).config.param_count() - 500 * hidden


def _embedding_inputs(seed):
  """Tokens from ids below 500, and positions to replace with input embeddings: each replaced
  position holds its own token id >= 500 (used nowhere else), so patching those rows of the
  embedding table is an independent way to feed the same vectors."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 500, size=(2, 12))
  replace = np.zeros((2, 12), bool)
  replace[0, [2, 3, 4]] = replace[1, [0, 7]] = True
  tokens[replace] = 500 + np.arange(replace.sum())
  embeddings = rng.normal(scale=0.05, size=(2, 12, 64)).astype(np.float32)
  seg = jnp.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2])
  return jnp.asarray(tokens), seg, jnp.asarray(replace), jnp.asarray(embeddings)


def test_input_embeddings_replace_exactly_the_masked_positions():
  model = create_model(tiny(), seed=3)
  tokens, seg, replace, embeddings = _embedding_inputs(0)
  forward = jax.jit(lambda model, mask: model.hidden_states(
      tokens, seg, input_embeddings=embeddings, input_embedding_mask=mask))
  plain = jax.jit(lambda model: model.hidden_states(tokens, seg))(model)
  # Mask all false: bit-identical to the plain call.
  np.testing.assert_array_equal(forward(model, jnp.zeros_like(replace)), plain)
  # Some positions replaced: the same as a table whose rows for those tokens hold the vectors.
  replaced = forward(model, replace)
  assert forward._cache_size() == 1  # one compiled program for any mask: no branching on data
  patched = create_model(tiny(), seed=3)
  patched.embed_tokens[...] = patched.embed_tokens[...].at[tokens[replace]].set(
      embeddings[replace])
  np.testing.assert_allclose(replaced, patched.hidden_states(tokens, seg), atol=1e-6, rtol=0)
  assert float(jnp.max(jnp.abs(replaced - plain))) > 1e-3


def test_gradients_reach_the_input_embeddings_at_masked_positions_only():
  model = create_model(tiny(), seed=3)
  tokens, seg, replace, embeddings = _embedding_inputs(1)
  grads = jax.grad(lambda e: jnp.sum(model(tokens, seg, input_embeddings=e,
                                           input_embedding_mask=replace) ** 2))(embeddings)
  norms = np.linalg.norm(np.asarray(grads), axis=-1)
  assert (norms[np.asarray(replace)] > 0).all()
  np.testing.assert_array_equal(norms[~np.asarray(replace)], 0.0)


def test_input_embedding_arguments_are_checked():
  model = create_model(tiny(), seed=3)
  tokens, seg, replace, embeddings = _embedding_inputs(2)
  with pytest.raises(ValueError, match="given together or not at all"):
    model(tokens, seg, input_embeddings=embeddings)
  with pytest.raises(ValueError, match=r"input_embeddings \(2, 12, 32\) should be \(2, 12, 64\)"):
    model(tokens, seg, input_embeddings=embeddings[..., :32], input_embedding_mask=replace)


def test_causal_model_sees_only_earlier_tokens_of_its_segment():
  model = create_model(tiny(), seed=5)
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, 512, size=(1, 12))
  seg = jnp.array([[1] * 6 + [2] * 4 + [0] * 2])
  base = model(jnp.asarray(tokens), seg, causal=True)
  changed = tokens.copy()
  changed[0, 3] = (changed[0, 3] + 1) % 512
  out = model(jnp.asarray(changed), seg, causal=True)
  # Positions before the change and the other segment keep their logits; later ones change.
  np.testing.assert_allclose(out[0, :3], base[0, :3], atol=1e-6)
  np.testing.assert_allclose(out[0, 6:10], base[0, 6:10], atol=1e-6)
  assert np.abs(out[0, 4:6] - base[0, 4:6]).max() > 1e-4
  # A packed row is its segments run alone, causally too.
  alone = model(jnp.asarray(tokens[:, 6:10]), causal=True)
  np.testing.assert_allclose(base[0, 6:10], alone[0], atol=2e-5)
  assert np.abs(base[0, :6] - model(jnp.asarray(tokens), seg)[0, :6]).max() > 1e-4


def cached_decode(model, tokens, prompt_lengths, prompt_columns):
  """Logits [B, L, V] of every column, computed with the KV cache: the prompts (right-padded
  to `prompt_columns`) in one prefill, then each row's following tokens one per step."""
  batch, length = tokens.shape
  prompt_segments = (np.arange(prompt_columns) < np.asarray(prompt_lengths)[:, None])
  prefill = nnx.jit(lambda m, t, s: m.prefill(t, s, length, causal=True))
  step = nnx.jit(lambda m, t, c, o: m.decode_step(t, c, o))
  hidden, cache = prefill(model, jnp.asarray(tokens[:, :prompt_columns]),
                          jnp.asarray(prompt_segments, jnp.int32))
  prompt_logits = np.asarray(hidden @ model.output_head())
  logits = np.zeros(tokens.shape + (prompt_logits.shape[-1],), np.float32)
  for row, prompt_length in enumerate(prompt_lengths):
    logits[row, :prompt_length] = prompt_logits[row, :prompt_length]
  offsets = np.asarray(prompt_lengths, np.int32)
  while offsets.min() < length:
    columns = np.minimum(offsets, length - 1)  # a row that is done repeats its last column
    step_logits, cache = step(model, jnp.asarray(tokens[np.arange(batch), columns])[:, None],
                              cache, jnp.asarray(columns))
    logits[np.arange(batch), columns] = np.asarray(step_logits)[:, 0]
    offsets = offsets + 1
  return logits, cache


@pytest.mark.parametrize("attention,scan_layers", [("xla", True), ("xla", False),
                                                   ("pallas", True)])
def test_kv_cache_decoding_equals_the_full_causal_recompute_token_for_token(attention,
                                                                            scan_layers):
  model = create_model(tiny(f"model.scan_layers={str(scan_layers).lower()}",
                            f"model.attention={attention}"), seed=6)
  tokens = np.random.default_rng(6).integers(0, 512, size=(2, 12))
  full = np.asarray(model(jnp.asarray(tokens), causal=True))
  # Row 0's prompt is 4 tokens (its padded prompt columns 4-6 are overwritten as it decodes),
  # row 1's 7.
  cached, cache = cached_decode(model, tokens, [4, 7], prompt_columns=7)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(cached.argmax(-1), full.argmax(-1))
  np.testing.assert_array_equal(cache.segment_ids, 1)  # every column written, as one sample
  # Bidirectional logits differ: the cache really decodes causally.
  assert np.abs(np.asarray(model(jnp.asarray(tokens))) - cached).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_a_bidirectional_block_inside_the_cache_replaces_its_slots_and_reads_the_rest(attention):
  # The sampler's dual cache: a block in the middle of each row (at its own offset) attends,
  # in both directions, to every cached column and to its own fresh keys and values.
  tokens = np.random.default_rng(9).integers(0, 512, size=(2, 12))
  segments = jnp.asarray([[1] * 12, [1] * 10 + [0] * 2])
  offsets, width = np.asarray([3, 5]), 4
  inside = (np.arange(12) >= offsets[:, None]) & (np.arange(12) < offsets[:, None] + width)
  changed = np.where(inside, (tokens + 7) % 512, tokens)
  extend = nnx.jit(lambda m, t, c, o: m.extend(t, c, o))
  for layers, rows in ((2, tokens), (1, changed)):
    # Two layers: the block's tokens unchanged, so it is the full forward's. One layer: a
    # column's keys and values depend on its own token only, so the cache filled from `tokens`
    # is the full forward's of `changed` outside the block, which must come from the cache.
    model = create_model(tiny(f"model.num_layers={layers}", f"model.attention={attention}"),
                         seed=9)
    _, cache = nnx.jit(lambda m, t, s: m.prefill(t, s, 12))(model, jnp.asarray(tokens), segments)
    block = jnp.asarray(rows[inside].reshape(2, width))
    hidden, written = extend(model, block, cache, jnp.asarray(offsets, jnp.int32))
    full = np.asarray(model.hidden_states(jnp.asarray(rows), segments))
    np.testing.assert_allclose(hidden, full[inside].reshape(2, width, -1), atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(written.segment_ids, segments)
  # The block's slots hold its own keys (those a prefill of `changed` writes, one layer), the
  # other slots the cached ones.
  _, changed_cache = nnx.jit(lambda m, t, s: m.prefill(t, s, 12))(model, jnp.asarray(changed),
                                                                  segments)
  np.testing.assert_allclose(written.keys, np.where(inside[None, :, :, None, None],
                                                    changed_cache.keys, cache.keys), atol=1e-6)
  assert np.abs(np.asarray(changed_cache.keys) - cache.keys)[:, inside].min() > 0


def test_kv_cache_runs_sharded_with_the_cache_batch_and_head_sharded():
  config = tiny()
  tokens = np.random.default_rng(8).integers(0, 512, size=(4, 10))
  reference, _ = cached_decode(create_model(config, seed=2), tokens, [3, 5, 6, 4], 6)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sharded_model = create_model(config, mesh, seed=2)
  with jax.set_mesh(mesh):
    sharded, cache = cached_decode(sharded_model, tokens, [3, 5, 6, 4], 6)
  np.testing.assert_allclose(sharded, reference, atol=2e-5, rtol=1e-5)
  # [layers, batch, length, kv heads, head dim]: rows over data, KV heads over tensor.
  expected = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, "tensor", None))
  assert cache.keys.sharding.is_equivalent_to(expected, 5)
  assert cache.values.sharding.is_equivalent_to(expected, 5)


def test_qk_norm_bounds_attention_logits_whatever_the_projection_scale():
  """The opt-in query/key norm: one head_dim scale per norm and layer (counted), attention
  unchanged when the q/k projections are scaled up 100x (without it, they change), and the
  KV-cached decode still equals the full recompute."""
  config = tiny("model.qk_norm=true", "model.scan_layers=false")
  model = create_model(config, seed=3)
  state = nnx.state(model, nnx.Param)
  assert sum(leaf.size for leaf in jax.tree.leaves(state)) == config.param_count()
  assert config.param_count() == tiny().param_count() + config.num_layers * 2 * 16
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 512, size=(2, 10)))

  def scaled_qk(model):
    for block in model.layers:
      for proj in (block.self_attn.q_proj, block.self_attn.k_proj):  # biases start at zero
        proj.kernel[...] = proj.kernel[...] * 100.0
    return model

  base = np.asarray(model(tokens))
  np.testing.assert_allclose(np.asarray(scaled_qk(create_model(config, seed=3))(tokens)), base,
                             atol=2e-4, rtol=1e-4)
  plain = tiny("model.scan_layers=false")
  assert np.abs(np.asarray(scaled_qk(create_model(plain, seed=3))(tokens))
                - np.asarray(create_model(plain, seed=3)(tokens))).max() > 1e-2
  full = np.asarray(model(tokens, causal=True))
  cached, _ = cached_decode(model, np.asarray(tokens), [3, 5], prompt_columns=5)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
