"""Autoregressive decoding, for a model trained with `train.objective.kind: ar`: one token per
forward pass with the model's KV cache, in the diffusion sampler's rows and result.

    result = decode(model, vocab, prompts, settings, uncond_prompts=None)

Rows are laid out as the sampler's (`sampler.DecodeRows`: a row's tokens sit at the same columns
alone or in a batch). The prompts run through the causal model once (`Transformer.prefill`
into a cache of prompt columns + canvas); then one compiled `lax.while_loop` runs one
`decode_step` per token, each row at its own next column. Per row, the token at canvas position
i comes from the logits at the column before it, with the sampler's rules in its order: CFG
`u + (w + 1)(c - u)` (the unconditional rows keep their own cache and take the same tokens),
never the mask id nor an embedding padding row, temperature, top_p, top_k, the repetition
penalty over the tokens generated so far; greedy (temperature 0) or a sample. A row stops after
it produces `<|im_end|>` or `<|endoftext|>`, and the rest of its canvas is `<|endoftext|>`;
the loop ends when every row has stopped or the canvas is full.

Of `DecodeSettings` it reads canvas (the most tokens a row generates), temperature, top_p,
top_k, repeat_penalty, cfg and seed; steps, alg, position_penalty, block_size, threshold and
prefill belong to diffusion decoding and do not apply.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.diffusion.sampler import DecodeRows, Plan, SampleResult, choose_tokens
from omnijax.diffusion.settings import DecodeSettings
from omnijax.kernels.attention import attention_rows
from omnijax.model.transformer import output_logits
from omnijax.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class ArPlan:
  """Everything static about one autoregressive decode (one compiled loop per distinct plan)."""

  choice: Plan  # the token choice's settings; those the decoder does not apply are neutral
  stop_ids: tuple[int, ...]  # <|im_end|>, <|endoftext|>
  pad_id: int

  @classmethod
  def of(cls, settings: DecodeSettings, vocab: Vocab) -> ArPlan:
    # Only the settings the decoder applies stay: decodes that differ in the diffusion ones
    # share one compilation.
    applied = DecodeSettings(canvas=settings.canvas, steps=1, temperature=settings.temperature,
                             top_p=settings.top_p, top_k=settings.top_k,
                             repeat_penalty=settings.repeat_penalty, cfg=settings.cfg)
    return cls(Plan.of(applied, vocab), (vocab.im_end_id, vocab.pad_id), vocab.pad_id)


def _decode_loop(graphdef, params, tokens, starts, active, key, *, plan: ArPlan):
  """The compiled loop. tokens/starts: [R] forward rows (R = B, or 2B with CFG); active: [B].
  -> (canvas [B, N], forward passes per row, batched forward passes)."""
  model = nnx.merge(graphdef, params)
  settings, stop_ids = plan.choice.settings, jnp.asarray(plan.stop_ids)
  batch, canvas_length = active.shape[0], settings.canvas
  prompt_columns = tokens.shape[1] - canvas_length
  row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(batch))

  def choose(canvas, done, passes, logits, index):
    """Canvas position `index` of every running row from the rows' next-token logits [R, V]."""
    logits = logits.astype(jnp.float32)[:, None]
    if settings.cfg > 0:
      cond_logits, uncond_logits = logits[:batch], logits[batch:]
      logits = uncond_logits + (settings.cfg + 1.0) * (cond_logits - uncond_logits)
    step_keys = (jax.vmap(lambda k: jax.random.fold_in(k, index))(row_keys)
                 if settings.temperature > 0 else None)
    token = choose_tokens(logits, canvas, plan.choice, step_keys)[0][:, 0]
    running = active & ~done
    canvas = canvas.at[:, index].set(jnp.where(running, token, canvas[:, index]))
    return (canvas, done | (running & jnp.isin(token, stop_ids)),
            passes + running.astype(jnp.int32))

  with attention_rows("dense"):  # one sample a row: `auto` picks for dense rows
    prompt_segments = (jnp.arange(prompt_columns) < starts[:, None]).astype(jnp.int32)
    hidden, cache = model.prefill(tokens[:, :prompt_columns], prompt_segments, tokens.shape[1],
                                  causal=True)
  last = jnp.take_along_axis(hidden, (starts - 1)[:, None, None], axis=1)
  state = choose(jnp.full((batch, canvas_length), plan.choice.mask_id, jnp.int32),
                 jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32),
                 output_logits(last, model.output_head())[:, 0], 0)

  def cond(loop_state):
    _, done, _, _, index = loop_state
    return (index < canvas_length) & jnp.any(active & ~done)

  def body(loop_state):
    canvas, done, passes, cache, index = loop_state
    fed = canvas[:, index - 1]
    fed = jnp.concatenate([fed, fed]) if settings.cfg > 0 else fed
    with attention_rows("dense"):
      logits, cache = model.decode_step(fed[:, None], cache, starts + index - 1)
    return (*choose(canvas, done, passes, logits[:, 0], index), cache, index + 1)

  canvas, _, passes, _, index = jax.lax.while_loop(cond, body, (*state, cache, jnp.int32(1)))
  # Positions a row never reached (it stopped) read <|endoftext|>, as a diffusion canvas's tail.
  return jnp.where(canvas == plan.choice.mask_id, plan.pad_id, canvas), passes, index


def decode(model, vocab: Vocab, prompts: Sequence, settings: DecodeSettings, *,
           uncond_prompts: Sequence | None = None, speech=None) -> SampleResult:
  """Generates up to `settings.canvas` tokens after each prompt, one per forward pass (the
  module's rules); the result as the diffusion sampler's (`forward_passes`: the tokens each
  row generated, its stop token included; `loop_steps`: the batched forward passes).
  Continuous speech input (`speech`) is refused: the prefill that would splice it reads
  token ids only."""
  if speech is not None and any(len(clips) for clips in speech):
    raise ValueError("the ar decoder takes no continuous speech input (its prefill reads token "
                     "ids only); decode speech-in tasks with the diffusion decoder")
  rows = DecodeRows.build(model, vocab, prompts, settings, uncond_prompts)
  if rows is None:
    return SampleResult.empty()
  (canvas, passes, loop_steps), seconds = rows.run(
      _decode_loop, ArPlan.of(settings, vocab), (rows.tokens, rows.starts, rows.active),
      (jax.random.key(settings.seed),))
  return rows.result(canvas, passes, loop_steps, seconds)
