"""The Qwen2/Dream backbone in Flax NNX, used bidirectionally within each packed segment (or,
with `causal=True`, causally within each segment: the autoregressive baseline).

`Transformer(config, rngs)(input_ids, segment_ids=None, positions=None, *, input_embeddings=None,
input_embedding_mask=None, speech_features=None, speech_lengths=None, causal=False) -> logits
[B, L, V]`: where `input_embedding_mask` [B, L] is true, `input_embeddings` [B, L, d] replace the
token embeddings. With `model.speech_encoder` configured the model holds the SenseVoice encoder
and its projector (`speech_encoder`, `speech_projector`, omnijax.model.speech) and takes speech
as the release does: `speech_features` [B, K, T, F] (up to K clips per row, CMVN applied) and
`speech_lengths` [B, K] (valid frames, 0: no clip) are encoded, projected and written over the
row's `<|context_of_audio|>` placeholders in order. `hidden_states(...)` stops before the lm_head
so that the training loss can apply `output_head()` chunk by chunk (omnijax.diffusion.objective)
instead of holding every position's logits.
Logits are raw (`logits[:, i] = lm_head(h_i)`): the Dream shift (h(i-1) predicts x(i)) belongs to
the objective and the sampler. Parameters are fp32 (`param_dtype`), matmuls run in
`compute_dtype`, and every parameter carries `logical_axes` metadata for omnijax.sharding.

Decoding with a KV cache (fixed shapes, jit-able): `init_cache(batch, length)` holds every
layer's keys and values for `length` columns per row; `extend(input_ids, cache, offsets)` runs
a block of tokens per row placed at columns `offsets[r]..`, writes their keys, values and
segment ids there and attends against the whole cache (`prefill` is an extend of an empty cache
at column 0, `decode_step` a few tokens per row, returning logits).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from omnijax.config import REMAT_POLICIES, ModelConfig
from omnijax.kernels.attention import get_attention
from omnijax.model.layers import Dense, matmul, normal_param
from omnijax.model.rope import apply_rope, segment_positions
from omnijax.model.speech import (SpeechEncoder, SpeechProjector, speech_embeddings,
                                  splice_speech)
from omnijax.sharding import constrain


def output_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
  """Final hidden states [B, L, d] x lm_head [d, V] -> logits [B, L, V] in hidden's dtype."""
  return constrain(matmul(hidden, head.astype(hidden.dtype)), ("batch", "length", "act_vocab"))


class RMSNorm(nnx.Module):
  """Variance in fp32; the weight multiplies after casting back (Qwen2 numerics)."""

  def __init__(self, size: int, config: ModelConfig):
    self.eps = config.rms_eps
    self.scale = nnx.Param(jnp.ones((size,), jnp.dtype(config.param_dtype)),
                           logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


KV_AXES = ("batch", "length", "act_kv_heads", "head_dim")  # one layer's keys or values


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Every layer's keys and values for a fixed number of columns per row, and each column's
  segment id (0: nothing written there yet, never attended). Keys carry RoPE already."""

  keys: jax.Array  # [layers, B, S, Hkv, D], compute dtype
  values: jax.Array  # [layers, B, S, Hkv, D]
  segment_ids: jax.Array  # [B, S] int32

  LOGICAL_AXES = ("layers", *KV_AXES)  # of keys and values; segment_ids: ("batch", "length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's slice of a KVCache during an extend, with where the block goes."""

  keys: jax.Array  # [B, S, Hkv, D]
  values: jax.Array
  segment_ids: jax.Array  # [B, S], the block's already written
  offsets: jax.Array  # [B] int32: the block's first column per row


def _write_rows(cache: jax.Array, block: jax.Array, offsets: jax.Array) -> jax.Array:
  """cache [B, S, ...] with block [B, T, ...] written at columns offsets[b].. of each row."""
  return jax.vmap(lambda row, new, offset: jax.lax.dynamic_update_slice_in_dim(
      row, new.astype(row.dtype), offset, axis=0))(cache, block, offsets)


class Attention(nnx.Module):
  """Grouped-query attention: q/k/v with bias, o without; RoPE; backend from config."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, hd = config.hidden_size, config.resolved_head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
    self.rope_theta = config.rope_theta
    self.attend = get_attention(config.attention)
    bias = config.qkv_bias
    self.q_proj = Dense(d, self.num_heads * hd, ("embed", "heads"), bias=bias, config=config,
                        rngs=rngs)
    self.k_proj = Dense(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=bias,
                        config=config, rngs=rngs)
    self.v_proj = Dense(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=bias,
                        config=config, rngs=rngs)
    self.o_proj = Dense(self.num_heads * hd, d, ("heads", "embed"), bias=False, config=config,
                        rngs=rngs)
    self.q_norm = RMSNorm(hd, config) if config.qk_norm else None
    self.k_norm = RMSNorm(hd, config) if config.qk_norm else None

  def _project(self, x, positions):
    """q [B, L, Hq, D], k and v [B, L, Hkv, D], with RoPE applied to q and k."""
    batch, length, _ = x.shape
    q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = constrain(checkpoint_name(apply_rope(q, positions, self.rope_theta), "query_proj"),
                  ("batch", "length", "act_heads", "head_dim"))
    k = constrain(checkpoint_name(apply_rope(k, positions, self.rope_theta), "key_proj"),
                  KV_AXES)
    v = constrain(checkpoint_name(v, "value_proj"), KV_AXES)
    return q, k, v

  def _output(self, out):
    batch, length = out.shape[:2]
    out = constrain(checkpoint_name(out, "attention_out"),
                    ("batch", "length", "act_heads", "head_dim"))
    return checkpoint_name(self.o_proj(out.reshape(batch, length, -1)), "out_proj")

  def __call__(self, x, segment_ids, positions, causal):
    q, k, v = self._project(x, positions)
    return self._output(self.attend(q, k, v, segment_ids, causal=causal))

  def cached(self, x, segment_ids, positions, causal, cache: LayerCache):
    """Attention of the block x [B, T, d] (at columns `cache.offsets`) against the cache, with
    the block's keys and values written into it first -> (output, the updated cache)."""
    q, k, v = self._project(x, positions)
    keys = constrain(_write_rows(cache.keys, k, cache.offsets), KV_AXES)
    values = constrain(_write_rows(cache.values, v, cache.offsets), KV_AXES)
    out = self.attend(q, keys, values, segment_ids, kv_segment_ids=cache.segment_ids,
                      causal=causal, q_offset=cache.offsets)
    return self._output(out), dataclasses.replace(cache, keys=keys, values=values)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.mlp_size
    self.gate_proj = Dense(d, f, ("embed", "mlp"), bias=False, config=config, rngs=rngs)
    self.up_proj = Dense(d, f, ("embed", "mlp"), bias=False, config=config, rngs=rngs)
    self.down_proj = Dense(f, d, ("mlp", "embed"), bias=False, config=config, rngs=rngs)

  def __call__(self, x):
    hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    hidden = constrain(checkpoint_name(hidden, "mlp_hidden"), ("batch", "length", "act_mlp"))
    return self.down_proj(hidden)


class Block(nnx.Module):
  """Pre-norm decoder layer; causal masking only when asked (the diffusion model runs without)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config)
    self.self_attn = Attention(config, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, segment_ids, positions, causal):
    return self._feed_forward(x + self.self_attn(self.input_layernorm(x), segment_ids, positions,
                                                 causal))

  def cached(self, x, segment_ids, positions, causal, cache: LayerCache):
    attended, cache = self.self_attn.cached(self.input_layernorm(x), segment_ids, positions,
                                            causal, cache)
    return self._feed_forward(x + attended), cache

  def _feed_forward(self, x):
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, ("batch", "length", "act_embed"))


def _replace_embeddings(token_embeddings: jax.Array, input_embeddings: jax.Array | None,
                        mask: jax.Array | None) -> jax.Array:
  """Token embeddings [B, L, d] with the masked positions taken from `input_embeddings` (cast to
  the compute dtype): a select, so shapes stay fixed and gradients reach the supplied ones."""
  if (input_embeddings is None) != (mask is None):
    raise ValueError("input_embeddings and input_embedding_mask are given together or not at all")
  if input_embeddings is None:
    return token_embeddings
  if input_embeddings.shape != token_embeddings.shape:
    raise ValueError(f"input_embeddings {input_embeddings.shape} should be "
                     f"{token_embeddings.shape} (batch, length, hidden size)")
  if mask.shape != token_embeddings.shape[:2]:
    raise ValueError(f"input_embedding_mask {mask.shape} should be {token_embeddings.shape[:2]}")
  return jnp.where(mask.astype(bool)[..., None], input_embeddings.astype(token_embeddings.dtype),
                   token_embeddings)


_SAVE_ONLY = jax.checkpoint_policies.save_only_these_names
# Config `model.remat` -> (apply remat?, jax.checkpoint policy). Names tag tensors above.
REMAT = {
    "none": (False, None),
    "full": (True, None),  # save nothing: recompute the whole layer in the backward pass
    "save_dots": (True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "save_dots_except_mlp": (True, _SAVE_ONLY("query_proj", "key_proj", "value_proj",
                                              "attention_out", "out_proj")),
    "save_attention_out": (True, _SAVE_ONLY("attention_out")),
}
# config.py validates names without importing jax; the two lists must agree.
assert set(REMAT) == set(REMAT_POLICIES), (sorted(REMAT), REMAT_POLICIES)


class Transformer(nnx.Module):
  """Token embedding, N blocks (scanned or a list), final norm, untied (or tied) lm_head."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.config = config
    param_dtype = jnp.dtype(config.param_dtype)
    self.embed_tokens = normal_param(rngs, (config.vocab_size, config.hidden_size),
                                     ("vocab", "embed"), config.init_std, param_dtype)
    if config.scan_layers:
      self.layers = self._stacked_blocks(config, rngs)
    else:
      self.layers = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config)
    self.lm_head = (None if config.tie_embeddings else
                    normal_param(rngs, (config.hidden_size, config.vocab_size),
                                 ("embed", "vocab"), config.init_std, param_dtype))
    # Created last, so that the backbone's weights at a seed do not depend on the encoder.
    if config.speech_encoder is None:
      self.speech_encoder = self.speech_projector = None
    else:
      self.speech_encoder = SpeechEncoder(config.speech_encoder, rngs)
      self.speech_projector = SpeechProjector(config, rngs)

  @staticmethod
  def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose parameters carry a leading `layers` axis (for lax.scan)."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def create(layer_rngs: nnx.Rngs) -> Block:
      return Block(config, layer_rngs)

    return create(rngs)

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, *, input_embeddings: jax.Array | None = None,
               input_embedding_mask: jax.Array | None = None,
               speech_features: jax.Array | None = None, speech_lengths: jax.Array | None = None,
               causal: bool = False) -> jax.Array:
    hidden = self.hidden_states(input_ids, segment_ids, positions,
                                input_embeddings=input_embeddings,
                                input_embedding_mask=input_embedding_mask,
                                speech_features=speech_features, speech_lengths=speech_lengths,
                                causal=causal)
    return output_logits(hidden, self.output_head())

  def output_head(self) -> jax.Array:
    """The lm_head as [d, V] (the transposed embedding when tied), in param dtype."""
    return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

  def hidden_states(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                    positions: jax.Array | None = None, *,
                    input_embeddings: jax.Array | None = None,
                    input_embedding_mask: jax.Array | None = None,
                    speech_features: jax.Array | None = None,
                    speech_lengths: jax.Array | None = None,
                    causal: bool = False) -> jax.Array:
    """Normed final hidden states [B, L, d] in compute dtype: everything before the lm_head."""
    config = self.config
    if segment_ids is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if positions is None:
      positions = segment_positions(segment_ids)
    x = self._embed(input_ids, input_embeddings, input_embedding_mask, speech_features,
                    speech_lengths)

    use_remat, policy = REMAT[config.remat]

    def layer(graphdef, layer_state, h):
      return nnx.merge(graphdef, layer_state)(h, segment_ids, positions, causal)

    if use_remat:
      # prevent_cse only matters outside scan, where XLA could otherwise merge recomputation.
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=not config.scan_layers,
                             static_argnums=(0,))
    if config.scan_layers:
      graphdef, stacked = nnx.split(self.layers)
      x, _ = jax.lax.scan(lambda h, layer_state: (layer(graphdef, layer_state, h), None),
                          x, stacked)
    else:
      for block in self.layers:
        x = layer(*nnx.split(block), x)

    return self.norm(x)

  def _splice_speech(self, token_embeddings: jax.Array, input_ids: jax.Array,
                     features: jax.Array | None, lengths: jax.Array | None) -> jax.Array:
    """The token embeddings with the projected speech over the `<|context_of_audio|>` slots.
    Whether speech is given is the call's structure (one compilation each); whether a batch
    holds any clip is decided at run time (speech_embeddings' lax.cond)."""
    if (features is None) != (lengths is None):
      raise ValueError("speech_features and speech_lengths are given together or not at all")
    if features is None:
      return token_embeddings
    if self.speech_encoder is None:
      raise ValueError("speech_features given, but this model has no speech encoder "
                       "(model.speech_encoder is not set)")
    if features.ndim != 4 or lengths.shape != features.shape[:2]:
      raise ValueError(f"speech_features {features.shape} should be [batch, clips, frames, "
                       f"features] and speech_lengths {lengths.shape} [batch, clips]")
    speech, frames = speech_embeddings(self.speech_encoder, self.speech_projector, features,
                                       lengths)
    return splice_speech(token_embeddings, input_ids, speech, frames,
                         self.config.vocab.build().audio_context_id)

  def _embed(self, input_ids, input_embeddings, input_embedding_mask, speech_features=None,
             speech_lengths=None) -> jax.Array:
    """Token embeddings, with the projected speech and any given embeddings over them."""
    compute_dtype = jnp.dtype(self.config.compute_dtype)
    x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(compute_dtype)
    x = self._splice_speech(x, input_ids, speech_features, speech_lengths)
    x = _replace_embeddings(x, input_embeddings, input_embedding_mask)
    return constrain(x, ("batch", "length", "act_embed"))

  # --- decoding with a KV cache -----------------------------------------------------------------
  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty cache of `length` columns per row (every column segment 0)."""
    config = self.config
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.resolved_head_dim)
    zeros = constrain(jnp.zeros(shape, jnp.dtype(config.compute_dtype)), KVCache.LOGICAL_AXES)
    segment_ids = constrain(jnp.zeros((batch, length), jnp.int32), ("batch", "length"))
    return KVCache(keys=zeros, values=zeros, segment_ids=segment_ids)

  def extend(self, input_ids: jax.Array, cache: KVCache, offsets, segment_ids=None,
             positions=None, *, causal: bool = False, input_embeddings=None,
             input_embedding_mask=None) -> tuple[jax.Array, KVCache]:
    """A block of T tokens per row [B, T] at columns offsets[r]..offsets[r]+T-1 of the cache
    (`offsets` an int or int32 [B]) -> (normed final hidden states [B, T, d], the cache with
    the block's keys, values and segment ids written there).

    The block attends to every cached column of its segment (the ones it just wrote included;
    with `causal`, only columns up to its own). Its segment ids default to 1 (one sample a
    row), its positions to its columns. The block must fit: offsets + T <= the cache's columns.
    """
    batch, block = input_ids.shape
    offsets = jnp.broadcast_to(jnp.asarray(offsets, jnp.int32), (batch,))
    if segment_ids is None:
      segment_ids = jnp.ones((batch, block), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if positions is None:
      positions = offsets[:, None] + jnp.arange(block, dtype=jnp.int32)
    kv_segment_ids = _write_rows(cache.segment_ids, segment_ids, offsets)
    x = self._embed(input_ids, input_embeddings, input_embedding_mask)

    def layer(block_module, h, keys, values):
      h, written = block_module.cached(h, segment_ids, positions, causal,
                                       LayerCache(keys, values, kv_segment_ids, offsets))
      return h, (written.keys, written.values)

    if self.config.scan_layers:
      graphdef, stacked = nnx.split(self.layers)
      x, (keys, values) = jax.lax.scan(
          lambda h, xs: layer(nnx.merge(graphdef, xs[0]), h, xs[1], xs[2]), x,
          (stacked, cache.keys, cache.values))
    else:
      written = []
      for index, block_module in enumerate(self.layers):
        x, layer_kv = layer(block_module, x, cache.keys[index], cache.values[index])
        written.append(layer_kv)
      keys, values = (jnp.stack(parts) for parts in zip(*written))
    return self.norm(x), KVCache(keys=constrain(keys, KVCache.LOGICAL_AXES),
                                 values=constrain(values, KVCache.LOGICAL_AXES),
                                 segment_ids=kv_segment_ids)

  def prefill(self, input_ids: jax.Array, segment_ids: jax.Array, cache_length: int, *,
              causal: bool = False, input_embeddings=None,
              input_embedding_mask=None) -> tuple[jax.Array, KVCache]:
    """Rows [B, L] (one sample a row from column 0, right-padded with segment 0) into a fresh
    cache of `cache_length` >= L columns -> (hidden states [B, L, d], the cache)."""
    return self.extend(input_ids, self.init_cache(input_ids.shape[0], cache_length), 0,
                       segment_ids, causal=causal, input_embeddings=input_embeddings,
                       input_embedding_mask=input_embedding_mask)

  def decode_step(self, tokens: jax.Array, cache: KVCache, offsets, *,
                  causal: bool = True) -> tuple[jax.Array, KVCache]:
    """Tokens [B, T] (usually T = 1) at columns `offsets` -> (logits [B, T, V], the cache)."""
    hidden, cache = self.extend(tokens, cache, offsets, causal=causal)
    return output_logits(hidden, self.output_head()), cache
