"""The release's continuous speech input (reference §1.4) in Flax NNX: SenseVoiceSmall's SANM
encoder, the projector onto the backbone width, and the splice of its outputs into the token
embeddings.

`SpeechEncoder(config, rngs)(features [B, T, F], lengths [B]) -> [B, T + 4, hidden]`: the four
query embeddings (language, event, emotion, text norm) are prepended to the T frames of stacked
fbank features (omnijax.data.speech_frontend); rows at or past `lengths + 4` are padding and
come out as zeros. It computes what FunASR's `SenseVoiceSmall.inference_encode` computes (the
release's call), without dropout. `SpeechProjector` maps its 512-d frames to the backbone width;
`splice_speech` writes them over the `<|context_of_audio|>` placeholders. Every parameter
carries `logical_axes` for omnijax.sharding, as in the backbone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.config import SPEECH_QUERIES, ModelConfig, SpeechEncoderConfig
from omnijax.kernels.attention import get_attention
from omnijax.model.layers import Dense
from omnijax.sharding import constrain

# The model's keyword arguments (and a batch's fields) that carry continuous speech:
# features [B, K, T, feature_size] of up to K clips per row, and their valid frames [B, K].
SPEECH_INPUTS = ("speech_features", "speech_lengths")

class LayerNorm(nnx.Module):
  """Mean and variance, scale and bias in fp32; the result is cast back (FunASR's LayerNorm)."""

  def __init__(self, size: int, eps: float, param_dtype: str):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((size,), jnp.dtype(param_dtype)), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((size,), jnp.dtype(param_dtype)), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(variance + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class SANMAttention(nnx.Module):
  """Self-attention plus an FSMN memory: a depthwise filter over the (unsplit) values, added to
  the attention output with the values themselves. FunASR fuses q, k, v in one linear; here they
  are three, so that each shards by heads like the backbone's."""

  def __init__(self, in_size: int, config: SpeechEncoderConfig, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads, self.head_dim = config.num_heads, d // config.num_heads
    self.attend = get_attention(config.attention)
    self.compute_dtype = jnp.dtype(config.compute_dtype)
    in_axis = "embed" if in_size == d else "speech_features"
    self.linear_q = Dense(in_size, d, (in_axis, "heads"), bias=True, config=config, rngs=rngs)
    self.linear_k = Dense(in_size, d, (in_axis, "heads"), bias=True, config=config, rngs=rngs)
    self.linear_v = Dense(in_size, d, (in_axis, "heads"), bias=True, config=config, rngs=rngs)
    self.linear_out = Dense(d, d, ("heads", "embed"), bias=True, config=config, rngs=rngs)
    taps = config.fsmn_kernel_size
    # taps[j] weighs the value j - (taps - 1) // 2 frames away (FunASR's zero padding).
    self.fsmn = nnx.Param(
        config.init_std * jax.random.normal(rngs.params(), (taps, d), jnp.dtype(config.param_dtype)),
        logical_axes=("fsmn_taps", "heads"))

  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    heads = lambda t: constrain(t.reshape(batch, length, self.num_heads, self.head_dim),
                                ("batch", "length", "act_heads", "head_dim"))
    values = self.linear_v(x)
    out = self.attend(heads(self.linear_q(x)), heads(self.linear_k(x)), heads(values),
                      valid.astype(jnp.int32))
    out = self.linear_out(out.reshape(batch, length, -1))
    return out + self._memory(values, valid)

  def _memory(self, values: jax.Array, valid: jax.Array) -> jax.Array:
    # Padding is zeroed before the filter so that it never leaks into the last real frames.
    values = jnp.where(valid[..., None], values, 0)
    taps = self.fsmn.shape[0]
    left = (taps - 1) // 2
    padded = jnp.pad(values, ((0, 0), (left, taps - 1 - left), (0, 0)))
    weights = self.fsmn[...].astype(self.compute_dtype)
    length = values.shape[1]
    filtered = sum(padded[:, j:j + length] * weights[j] for j in range(taps))
    return jnp.where(valid[..., None], filtered + values, 0)


class FeedForward(nnx.Module):
  """w_2(relu(w_1(x))), with biases."""

  def __init__(self, config: SpeechEncoderConfig, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.mlp_size
    self.w_1 = Dense(d, f, ("embed", "mlp"), bias=True, config=config, rngs=rngs)
    self.w_2 = Dense(f, d, ("mlp", "embed"), bias=True, config=config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = constrain(jax.nn.relu(self.w_1(x)), ("batch", "length", "act_mlp"))
    return self.w_2(hidden)


class SANMBlock(nnx.Module):
  """Pre-norm SANM layer. The input block (in_size != hidden_size) has no residual around its
  attention, as in FunASR's EncoderLayerSANM."""

  def __init__(self, in_size: int, config: SpeechEncoderConfig, rngs: nnx.Rngs):
    self.attention_residual = in_size == config.hidden_size
    eps, dtype = config.layer_norm_eps, config.param_dtype
    self.norm1 = LayerNorm(in_size, eps, dtype)
    self.self_attn = SANMAttention(in_size, config, rngs)
    self.norm2 = LayerNorm(config.hidden_size, eps, dtype)
    self.feed_forward = FeedForward(config, rngs)

  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    attention = self.self_attn(self.norm1(x), valid)
    x = x + attention if self.attention_residual else attention
    x = x + self.feed_forward(self.norm2(x))
    return constrain(x, ("batch", "length", "act_embed"))


def _stacked_blocks(config: SpeechEncoderConfig, count: int, rngs: nnx.Rngs) -> SANMBlock:
  """`count` hidden-width blocks as one block whose parameters have a leading `layers` axis."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=0, out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
  def create(layer_rngs: nnx.Rngs) -> SANMBlock:
    return SANMBlock(config.hidden_size, config, layer_rngs)

  return create(rngs)


def _run_stacked(blocks: SANMBlock, x: jax.Array, valid: jax.Array) -> jax.Array:
  graphdef, stacked = nnx.split(blocks)
  step = lambda h, layer_state: (nnx.merge(graphdef, layer_state)(h, valid), None)
  return jax.lax.scan(step, x, stacked)[0]


def sinusoidal_encoding(length: int, width: int) -> jax.Array:
  """[length, width] fp32: positions 1..length; sin and cos halves; timescales 1..10^4 spread
  over width / 2 - 1 steps (FunASR's SinusoidalPositionEncoder, computed in the same order)."""
  increment = jnp.log(jnp.float32(10000.0)) / (width / 2 - 1)
  inverse_timescales = jnp.exp(jnp.arange(width // 2, dtype=jnp.float32) * -increment)
  scaled = jnp.arange(1, length + 1, dtype=jnp.float32)[:, None] * inverse_timescales[None]
  return jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=1)


class SpeechEncoder(nnx.Module):
  """SenseVoiceEncoderSmall with SenseVoiceSmall's query table (`embed` there, `queries` here)."""

  def __init__(self, config: SpeechEncoderConfig, rngs: nnx.Rngs):
    self.config = config
    self.queries = nnx.Param(
        config.init_std * jax.random.normal(
            rngs.params(), (config.num_query_embeddings, config.feature_size),
            jnp.dtype(config.param_dtype)),
        logical_axes=("speech_queries", "speech_features"))
    self.input_block = SANMBlock(config.feature_size, config, rngs)
    self.blocks = _stacked_blocks(config, config.num_blocks - 1, rngs)
    self.after_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, config.param_dtype)
    self.tp_blocks = _stacked_blocks(config, config.tp_blocks, rngs)
    self.tp_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, config.param_dtype)

  def __call__(self, features: jax.Array, lengths: jax.Array) -> jax.Array:
    """features [B, T, feature_size] (CMVN applied), lengths [B] -> [B, T + 4, hidden_size]."""
    config = self.config
    batch, frames, width = features.shape
    queries = jnp.take(self.queries[...], jnp.asarray(config.query_ids), axis=0)
    x = jnp.concatenate([jnp.broadcast_to(queries.astype(jnp.float32), (batch, *queries.shape)),
                         features.astype(jnp.float32)], axis=1)
    length = frames + SPEECH_QUERIES
    valid = jnp.arange(length)[None, :] < (lengths[:, None] + SPEECH_QUERIES)
    # The scale is the output width's square root although the input is feature_size wide.
    x = x * config.hidden_size ** 0.5 + sinusoidal_encoding(length, width)
    x = constrain(x.astype(jnp.dtype(config.compute_dtype)), ("batch", "length", "act_embed"))
    x = self.input_block(x, valid)
    x = self.after_norm(_run_stacked(self.blocks, x, valid))
    x = self.tp_norm(_run_stacked(self.tp_blocks, x, valid))
    return jnp.where(valid[..., None], x, 0)


class SpeechProjector(nnx.Module):
  """The release's ResamplerProjector: LayerNorm, Linear (no bias), exact GELU, Linear (no bias),
  from the encoder width to the backbone's; linears drawn from N(0, init_std) as there."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    width = config.speech_encoder.hidden_size
    self.norm = LayerNorm(width, config.speech_encoder.layer_norm_eps, config.param_dtype)
    self.linear_in = Dense(width, config.hidden_size, ("embed", "mlp"), bias=False, config=config,
                           rngs=rngs)
    self.linear_out = Dense(config.hidden_size, config.hidden_size, ("mlp", "embed"), bias=False,
                            config=config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_out(jax.nn.gelu(self.linear_in(self.norm(x)), approximate=False))


def encoded_frames(lengths: jax.Array | np.ndarray | int):
  """Encoder output frames (= `<|context_of_audio|>` placeholders) for `lengths` input frames."""
  return lengths + SPEECH_QUERIES


def speech_embeddings(encoder: SpeechEncoder, projector: SpeechProjector, features: jax.Array,
                      lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Encodes and projects up to K clips per row: features [B, K, T, F], lengths [B, K] (0: no
  clip) -> ([B, K, T + 4, D], the placeholders each clip fills [B, K]). A batch without any clip
  skips the encoder at run time (lax.cond), keeping one compiled shape."""
  batch, clips, frames, width = features.shape

  def encode(features):
    encoded = encoder(features.reshape(batch * clips, frames, width), lengths.reshape(-1))
    return projector(encoded).reshape(batch, clips, encoded_frames(frames), -1)

  out = projector.linear_out
  silence = lambda _: jnp.zeros((batch, clips, encoded_frames(frames), out.kernel.shape[1]),
                                out.compute_dtype)
  projected = jax.lax.cond(jnp.any(lengths > 0), encode, silence, features)
  return projected, jnp.where(lengths > 0, encoded_frames(lengths), 0)


def splice_speech(token_embeddings: jax.Array, input_ids: jax.Array, speech: jax.Array,
                  speech_lengths: jax.Array, placeholder_id: int) -> jax.Array:
  """Writes projected speech over the placeholders, as the release does.

  token_embeddings [B, L, D]; speech [B, K, S, D] holds row b's clips in order and
  speech_lengths [B, K] their valid frames (speech_embeddings' outputs). The n-th placeholder of
  row b (input_ids == placeholder_id) takes the n-th valid frame of row b's clips taken one after
  another; placeholders past the last frame keep their token embedding. Fixed shapes, no
  per-batch Python branching.
  """
  batch, clips, frames, width = speech.shape
  is_placeholder = input_ids == placeholder_id
  rank = jnp.cumsum(is_placeholder, axis=1) - 1  # [B, L]: which placeholder of its row
  ends = jnp.cumsum(speech_lengths, axis=1)  # [B, K]
  clip = jnp.sum(rank[:, :, None] >= ends[:, None, :], axis=-1)  # [B, L]
  clip_index = jnp.minimum(clip, clips - 1)
  start = jnp.take_along_axis(ends - speech_lengths, clip_index, axis=1)
  frame = jnp.clip(rank - start, 0, frames - 1)
  flat = speech.reshape(batch, clips * frames, width)
  gathered = jnp.take_along_axis(flat, (clip_index * frames + frame)[..., None], axis=1)
  replace = is_placeholder & (clip < clips)
  return jnp.where(replace[..., None], gathered.astype(token_embeddings.dtype), token_embeddings)
