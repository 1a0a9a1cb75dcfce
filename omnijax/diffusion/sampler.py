"""The reverse process: batched masked-diffusion decoding with the release's rules (reference §4).

    canvases = sample(model, vocab, prompts, canvas=68, steps=16)

Every row is `prompt + canvas mask tokens`, right-padded (segment 0, never attended) to one
length, so a row's own tokens sit at the same columns whether it runs alone or in a batch.
One `lax.while_loop` runs all steps with fixed shapes; each iteration is one batched forward
(conditional and, with CFG, unconditional rows together) followed by, per row and in this order:

  1. Dream shift: the logits at j - 1 score the token at canvas position j;
  2. CFG `u + (w + 1)(c - u)`, the unconditional row holding the same canvas (aligned);
  3. the mask id and the embedding's padding rows (>= vocab.size) are never produced;
  4. temperature, top-p (Dream's rule), top-k, repetition penalty (from the second step, on
     the ids in the canvas the previous step left, as the release), position penalty;
  5. softmax; token = argmax (or a sample), confidence by `alg`;
  6. the k most confident masked positions of the current block take their tokens, with
     k = max(1, floor(m (1 - s / t))) from `ts = linspace(1, 1e-3, steps + 1)` (all at a block's
     last step), or with `threshold`, every one above it (at least one).

The loop ends as soon as no row has a mask left, so threshold decoding saves forward passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from omnijax.diffusion.settings import DecodeSettings
from omnijax.kernels.attention import attention_rows
from omnijax.sharding import logical_to_spec, shard_count
from omnijax.vocab import Vocab

SCHEDULE_EPS = 1e-3  # DreamGenerationConfig's eps: ts = linspace(1, eps, steps + 1)
POSITION_PENALTY_FREE = 100  # the first 100 masked positions are never position-penalised
PROMPT_BUCKET = 16  # prompt columns round up to this, so nearby prompt lengths share a compile


@dataclasses.dataclass(frozen=True)
class SampleResult:
  canvases: list[np.ndarray]  # per row: `canvas` int32 tokens, untrimmed
  forward_passes: np.ndarray  # per row: forward passes that decoded some of its tokens
  loop_steps: int  # batched forward passes the loop ran (the slowest row's count)
  seconds: float  # wall time of the decode itself (compilation excluded)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one decode: one compiled loop per distinct plan. The steps per
  block, the seed and the prefilled canvas are inputs of the compiled loop, so they are cleared
  here and decodes that differ only in them share one compilation."""

  settings: DecodeSettings
  mask_id: int
  vocab_size: int  # ids at or above it (embedding padding rows) are never produced

  @classmethod
  def of(cls, settings: DecodeSettings, vocab: Vocab) -> _Plan:
    static = dataclasses.replace(settings, steps=1, seed=0, prefill=())
    return cls(static, vocab.mask_id, vocab.size)

  @property
  def blocks(self) -> tuple[tuple[int, int], ...]:
    """(start, end) per block, left to right."""
    plan = block_plan(self.settings.canvas, self.settings.canvas, self.settings.block_size)
    return tuple((start, end) for start, end, _ in plan)


def block_plan(canvas: int, steps: int, block_size: int) -> tuple[tuple[int, int, int], ...]:
  """Blocks (start, end, steps): `min(steps, canvas)` steps shared in proportion to length."""
  steps = min(steps, canvas)
  if block_size <= 0 or block_size >= canvas:
    return ((0, canvas, steps),)
  ends = list(range(block_size, canvas, block_size)) + [canvas]
  plan, start, done = [], 0, 0
  for end in ends:
    cumulative = round(steps * end / canvas)
    block_steps = min(end - start, max(1, cumulative - done))
    plan.append((start, end, block_steps))
    done += block_steps
    start = end
  return tuple(plan)


def ctrl_scale(logits: jax.Array, factor: jax.Array) -> jax.Array:
  """CTRL's penalty: a logit z becomes z * c when negative, z / c otherwise (not a temperature)."""
  return jnp.where(logits < 0, logits * factor, logits / factor)


def top_p_top_k_filter(logits: jax.Array, top_p: float = 1.0, top_k: int = 0) -> jax.Array:
  """Dream's nucleus, then top-k; dropped tokens get -inf.

  Nucleus: a token is dropped when the tokens ranked above it already hold more than top_p of
  the probability, so the top token always stays. Top-k: logits below the k-th largest are
  dropped. Both keep a prefix of the same ranking, so together they keep the first
  min(nucleus, k) tokens, and with top_k only the k largest need sorting (not the vocabulary).
  """
  vocab = logits.shape[-1]
  ranked_count = vocab if top_k <= 0 else min(top_k, vocab)
  if ranked_count == vocab:
    ranked = jnp.sort(logits, axis=-1)[..., ::-1]
  else:
    ranked = jax.lax.top_k(logits, ranked_count)[0]
  kept = jnp.full(logits.shape[:-1] + (1,), ranked_count)
  if top_p < 1:
    probs = jnp.exp(ranked - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_above <= top_p, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(ranked, kept - 1, axis=-1)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def position_factors(masked: jax.Array, gamma: float) -> jax.Array:
  """[B, N] bool masked -> [B, N] factors: rank r among n masked positions (sequence order),
  1 for r < 100 and 1 + (gamma - 1)(r - 100)/(n - 100) after, only while n > 100."""
  free = POSITION_PENALTY_FREE
  n = jnp.sum(masked, axis=-1, keepdims=True)
  rank = jnp.cumsum(masked, axis=-1) - 1
  ramp = 1.0 + (gamma - 1.0) * (rank - free) / jnp.maximum(n - free, 1)
  return jnp.where((n > free) & (rank >= free), ramp, 1.0)


def choose_tokens(logits: jax.Array, canvas: jax.Array, plan: _Plan, keys: jax.Array | None,
                  first_step: bool | jax.Array = False) -> tuple[jax.Array, jax.Array]:
  """Per-position token and confidence from [B, N, V] (shifted, guided) logits (§4.3-4.4).
  `canvas` is the canvas after the previous step; at the `first_step` there is none, and the
  release penalises no repetition (not even a prefilled <|begin_of_audio|>)."""
  settings = plan.settings
  vocab_ids = jnp.arange(logits.shape[-1])
  allowed = (vocab_ids < plan.vocab_size) & (vocab_ids != plan.mask_id)
  logits = jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)
  if settings.temperature > 0:
    logits = logits / settings.temperature
  if settings.top_p < 1 or settings.top_k > 0:
    logits = top_p_top_k_filter(logits, settings.top_p, settings.top_k)
  if settings.repeat_penalty != 1:
    rows = jnp.arange(canvas.shape[0])[:, None]
    present = jnp.zeros((canvas.shape[0], logits.shape[-1]), bool).at[rows, canvas].set(True)
    present = present.at[:, plan.mask_id].set(False) & ~jnp.asarray(first_step)
    logits = ctrl_scale(logits, jnp.where(present[:, None, :], settings.repeat_penalty, 1.0))
  if settings.position_penalty != 1:
    factors = position_factors(canvas == plan.mask_id, settings.position_penalty)
    logits = ctrl_scale(logits, factors[..., None])
  probs = jax.nn.softmax(logits, axis=-1)
  if settings.temperature > 0:
    tokens = jax.vmap(lambda key, row: jax.random.categorical(key, row, axis=-1))(keys, logits)
  else:
    tokens = jnp.argmax(logits, axis=-1)
  chosen_prob = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  if settings.alg == "maskgit_plus":
    confidence = chosen_prob
  elif settings.alg == "topk_margin":
    top2 = jax.lax.top_k(probs, 2)[0]
    confidence = top2[..., 0] - top2[..., 1]
  else:  # entropy: negative entropy, higher is more confident
    confidence = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
  return tokens.astype(jnp.int32), confidence


def commit_counts(masked_in_block: jax.Array, confidence: jax.Array, local_step: jax.Array,
                  block_steps: jax.Array, threshold: float | None) -> jax.Array:
  """How many masked positions each row commits this step (§4.2, or Fast-dLLM's threshold)."""
  m = jnp.sum(masked_in_block, axis=-1)
  if threshold is None:
    t = 1.0 - local_step * (1.0 - SCHEDULE_EPS) / block_steps
    s = 1.0 - (local_step + 1) * (1.0 - SCHEDULE_EPS) / block_steps
    k = jnp.maximum(1, jnp.floor(m * (1.0 - s / t)).astype(jnp.int32))
  else:
    k = jnp.maximum(1, jnp.sum(masked_in_block & (confidence > threshold), axis=-1))
  return jnp.where(local_step == block_steps - 1, m, jnp.minimum(k, m))


def _rows_with_canvas(base: jax.Array, canvas: jax.Array, starts: jax.Array) -> jax.Array:
  return jax.vmap(lambda row, c, s: jax.lax.dynamic_update_slice(row, c, (s,)))(base, canvas,
                                                                                starts)


def _decode_loop(graphdef, params, base, segment_ids, starts, canvas, active, steps_per_block,
                 key, *, plan: _Plan):
  """The compiled loop. base/segment_ids/starts: [R] forward rows (R = B, or 2B with CFG: the
  unconditional rows after the conditional ones); canvas/active: [B]."""
  model = nnx.merge(graphdef, params)
  batch, n = canvas.shape
  blocks = np.asarray(plan.blocks, np.int32)
  block_start, block_end = jnp.asarray(blocks[:, 0]), jnp.asarray(blocks[:, 1])
  columns = jnp.arange(n)
  positions = jnp.broadcast_to(jnp.arange(base.shape[1], dtype=jnp.int32), base.shape)
  row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(batch))

  def masked_in_block(canvas, block):
    inside = (columns >= block_start[block]) & (columns < block_end[block])
    return (canvas == plan.mask_id) & inside & active[:, None]

  def cond(state):
    canvas, block = state[0], state[1]
    return (block < len(plan.blocks)) & jnp.any((canvas == plan.mask_id) & active[:, None])

  def body(state):
    canvas, block, local_step, passes, loop_steps = state
    cfg_canvas = jnp.concatenate([canvas, canvas]) if plan.settings.cfg > 0 else canvas
    with attention_rows("dense"):  # one prompt + canvas a row: `auto` picks for dense rows
      logits = model(_rows_with_canvas(base, cfg_canvas, starts), segment_ids, positions)
    # Dream shift: canvas position j is scored by the logits at (start + j) - 1.
    logits = jnp.take_along_axis(logits, (starts[:, None] - 1 + columns)[..., None], axis=1)
    logits = logits.astype(jnp.float32)
    if plan.settings.cfg > 0:
      cond_logits, uncond_logits = logits[:batch], logits[batch:]
      logits = uncond_logits + (plan.settings.cfg + 1.0) * (cond_logits - uncond_logits)
    step_keys = (jax.vmap(lambda k: jax.random.fold_in(k, loop_steps))(row_keys)
                 if plan.settings.temperature > 0 else None)
    tokens, confidence = choose_tokens(logits, canvas, plan, step_keys,
                                       first_step=loop_steps == 0)
    candidates = masked_in_block(canvas, block)
    k = commit_counts(candidates, confidence, local_step, steps_per_block[block],
                      plan.settings.threshold)
    # Rank masked positions by confidence (stable: ties go to the earlier position).
    order = jnp.argsort(-jnp.where(candidates, confidence, -jnp.inf), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    commit = candidates & (rank < k[:, None])
    passes = passes + jnp.any(candidates, axis=-1).astype(jnp.int32)
    canvas = jnp.where(commit, tokens, canvas)
    local_step = local_step + 1
    block_done = (local_step >= steps_per_block[block]) | ~jnp.any(masked_in_block(canvas, block))
    block = jnp.where(block_done, block + 1, block)
    local_step = jnp.where(block_done, 0, local_step)
    return canvas, block, local_step, passes, loop_steps + 1

  zero = jnp.zeros((), jnp.int32)
  state = (canvas, zero, zero, jnp.zeros((batch,), jnp.int32), zero)
  canvas, _, _, passes, loop_steps = jax.lax.while_loop(cond, body, state)
  return canvas, passes, loop_steps


_EXECUTABLES: dict = {}  # (graphdef, plan, input shapes and shardings) -> compiled loop
_MAX_EXECUTABLES = 64


def _compiled(graphdef, plan: _Plan, args):
  """The compiled loop for these inputs, compiled ahead of time so decode time is measurable."""
  signature = tuple((x.shape, x.dtype, getattr(x, "sharding", None))
                    for x in jax.tree.leaves(args))
  key = (graphdef, plan, signature)
  if key not in _EXECUTABLES:
    if len(_EXECUTABLES) >= _MAX_EXECUTABLES:
      _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
    jitted = jax.jit(functools.partial(_decode_loop, graphdef, plan=plan))
    _EXECUTABLES[key] = jitted.lower(*args).compile()
  return _EXECUTABLES[key]


def _model_mesh(params) -> jax.sharding.Mesh | None:
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


def _as_prompts(prompts, vocab: Vocab, what: str) -> list[np.ndarray]:
  rows = []
  for number, prompt in enumerate(prompts):
    array = np.asarray(prompt)
    if array.ndim != 1 or not len(array):
      raise ValueError(f"{what}[{number}]: expected a non-empty 1-D array of token ids, got "
                       f"shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{what}[{number}]: token ids must be integers, got dtype {array.dtype}")
    vocab.check_ids(array, f"{what}[{number}]")
    rows.append(array.astype(np.int32))
  return rows


def decode(model, vocab: Vocab, prompts: Sequence, settings: DecodeSettings, *,
           uncond_prompts: Sequence | None = None) -> SampleResult:
  """Decodes `settings.canvas` tokens after each prompt (`sample`'s rules), returning each
  row's canvas with its forward passes and the loop's step count."""
  if settings.cfg > 0 and uncond_prompts is None:
    raise ValueError("cfg > 0 needs uncond_prompts (one per prompt)")
  if uncond_prompts is not None and len(uncond_prompts) != len(prompts):
    raise ValueError(f"uncond_prompts has {len(uncond_prompts)} rows, prompts {len(prompts)}")
  for offset, token in settings.prefill:
    vocab.check_ids([token], f"prefill at offset {offset}")
    if token == vocab.mask_id:
      raise ValueError(f"prefill at offset {offset}: the mask id cannot be prefilled")
  rows = _as_prompts(prompts, vocab, "prompts")
  if not rows:
    return SampleResult([], np.zeros((0,), np.int32), 0, 0.0)
  uncond = _as_prompts(uncond_prompts, vocab, "uncond_prompts") if settings.cfg > 0 else []
  graphdef, params = nnx.split(model)
  model_vocab = model.config.vocab_size
  if model_vocab < vocab.size:
    raise ValueError(f"the model's embedding has {model_vocab} rows, fewer than the "
                     f"vocabulary's {vocab.size} ids")
  mesh = _model_mesh(params)
  batch, canvas = len(rows), settings.canvas
  batch_shards = 1 if mesh is None else shard_count("batch", mesh)
  padded_batch = -(-batch // batch_shards) * batch_shards
  # Padding rows (inactive) repeat row 0's prompt; they never count toward stopping.
  rows = rows + [rows[0]] * (padded_batch - batch)
  if uncond:
    uncond = uncond + [uncond[0]] * (padded_batch - batch)
  forward_rows = rows + uncond
  prompt_columns = -(-max(map(len, forward_rows)) // PROMPT_BUCKET) * PROMPT_BUCKET
  length = prompt_columns + canvas
  base = np.full((len(forward_rows), length), vocab.pad_id, np.int32)
  segment_ids = np.zeros((len(forward_rows), length), np.int32)
  for r, prompt in enumerate(forward_rows):
    base[r, :len(prompt)] = prompt
    segment_ids[r, :len(prompt) + canvas] = 1
  starts = np.asarray([len(prompt) for prompt in forward_rows], np.int32)
  start_canvas = np.full((padded_batch, canvas), vocab.mask_id, np.int32)
  for offset, token in settings.prefill:
    start_canvas[:, offset] = token
  active = np.arange(padded_batch) < batch
  plan = _Plan.of(settings, vocab)
  inputs = (base, segment_ids, starts, start_canvas, active)
  if mesh is not None:
    spec = logical_to_spec(("batch",), mesh)
    inputs = tuple(jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec, *[None] * (x.ndim - 1))))
                   for x in inputs)
  blocks = block_plan(canvas, settings.steps, settings.block_size)
  steps_per_block = jnp.asarray([block_steps for _, _, block_steps in blocks], jnp.int32)
  args = (params, *inputs, steps_per_block, jax.random.key(settings.seed))
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    run = _compiled(graphdef, plan, args)
    start = time.perf_counter()
    out, passes, loop_steps = jax.block_until_ready(run(*args))
    seconds = time.perf_counter() - start
  out, passes = np.asarray(out), np.asarray(passes)
  return SampleResult([out[r].copy() for r in range(batch)], passes[:batch], int(loop_steps),
                      seconds)


def sample_with_stats(model, vocab: Vocab, prompts: Sequence, *,
                      uncond_prompts: Sequence | None = None, **settings) -> SampleResult:
  """`sample`, also returning forward passes per row and the loop's step count."""
  return decode(model, vocab, prompts, DecodeSettings(**settings), uncond_prompts=uncond_prompts)


def sample(model, vocab: Vocab, prompts: Sequence, *, uncond_prompts: Sequence | None = None,
           **settings) -> list[np.ndarray]:
  """Decodes `canvas` tokens after each prompt; returns each row's canvas, untrimmed.

  model: the NNX Transformer (sharded or not; a sharded model runs on its mesh);
  prompts: 1-D int arrays of any lengths; settings: the keyword arguments of `DecodeSettings`
  (canvas and steps required; alg, temperature, top_p, top_k, repeat_penalty,
  position_penalty, cfg, block_size, threshold, prefill, seed). cfg > 0 needs `uncond_prompts`
  (one per prompt), whose rows hold the same canvas as the conditional ones. block_size > 0
  decodes blocks left to right; threshold commits every masked position whose confidence is
  above it (at least one per step; the confidence of `alg`: a probability, a margin, or a
  negative entropy), with `steps` as the ceiling; prefill: {canvas offset: token id} written
  before decoding. A row's tokens never depend on the other rows at temperature 0.
  """
  return sample_with_stats(model, vocab, prompts, uncond_prompts=uncond_prompts,
                           **settings).canvases
