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

`cache="prefix"` (Fast-dLLM's prefix cache) keeps the prompt's keys and values from a forward
of the whole rows, made at each block's first step and every `cache_refresh` steps (0: only
there); the steps between run only the canvas (and the prompt's last token, whose logits score
canvas position 0) against them. `cache="dual"` (Fast-dLLM's dual cache) keeps every column's
keys and values from that forward and runs only the current block's window between refreshes
(and the column before it): the prompt and the canvas blocks before and after the block come
from the cache. The window is `block_size` wide (the whole canvas without blocks, where dual is
prefix); a last, shorter block's window ends at the canvas end, so its shape stays fixed.
Attention is bidirectional, so the cached columns are stale by the tokens committed since:
approximate, exact with `cache_refresh=1` (every step refreshes).
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
from omnijax.model.transformer import output_logits
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
  # Diffusion only, per row: those of its forward passes that ran the whole rows (uncached: all
  # of them; cached: the refreshes; the others ran the cached window).
  whole_row_passes: np.ndarray | None = None

  @classmethod
  def empty(cls) -> SampleResult:
    return cls([], np.zeros((0,), np.int32), 0, 0.0, np.zeros((0,), np.int32))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about one decode: one compiled loop per distinct plan. The steps per
  block, the seed and the prefilled canvas are inputs of the compiled loop, so they are cleared
  here and decodes that differ only in them share one compilation."""

  settings: DecodeSettings
  mask_id: int
  vocab_size: int  # ids at or above it (embedding padding rows) are never produced

  @classmethod
  def of(cls, settings: DecodeSettings, vocab: Vocab) -> Plan:
    static = dataclasses.replace(settings, steps=1, seed=0, prefill=())
    return cls(static, vocab.mask_id, vocab.size)

  @property
  def window(self) -> int:
    """The canvas positions a cached step runs: the whole canvas (prefix cache) or the widest
    block (dual cache)."""
    plan_blocks = self.blocks
    if self.settings.cache != "dual" or len(plan_blocks) == 1:
      return self.settings.canvas
    return max(end - start for start, end in plan_blocks)

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


def choose_tokens(logits: jax.Array, canvas: jax.Array, plan: Plan, keys: jax.Array | None,
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


def _canvas_logits(model, rows, segment_ids, positions, starts, columns, cache, local_step,
                   window_start, plan: Plan, speech: dict | None = None):
  """[R, N, V] logits scoring each row's canvas positions, the cache (None without) and whether
  this step ran the whole rows. `speech`: the rows' continuous speech input (uncached only).

  Dream shift: canvas position j is scored by the logits at column start + j - 1. Uncached,
  one forward of the whole rows. With a cache, the whole rows run (and fill the cache) at every
  block's first step and every `cache_refresh` steps; otherwise only the window (canvas
  positions window_start .. + plan.window - 1) and the column before it run against the cached
  keys and values, and the positions outside the window get zero logits (never committed: the
  window holds the current block).
  """
  settings = plan.settings

  def whole_rows(cache):
    with attention_rows("dense"):  # one prompt + canvas a row: `auto` picks for dense rows
      if cache is None:
        logits = model(rows, segment_ids, positions, **(speech or {}))
      else:
        hidden, cache = model.prefill(rows, segment_ids, rows.shape[1])
        logits = output_logits(hidden, model.output_head())
    return jnp.take_along_axis(logits, (starts[:, None] - 1 + columns)[..., None], axis=1), cache

  if cache is None:
    return (*whole_rows(None), jnp.bool_(True))

  def window(cache):
    first = starts + window_start - 1  # the column before the window, per row
    block = jnp.take_along_axis(rows, first[:, None] + jnp.arange(plan.window + 1), axis=1)
    with attention_rows("dense"):
      hidden, cache = model.extend(block, cache, first)
    logits = output_logits(hidden[:, :-1], model.output_head())
    canvas_logits = jnp.zeros((rows.shape[0], columns.shape[0], logits.shape[-1]), logits.dtype)
    canvas_logits = jax.lax.dynamic_update_slice_in_dim(canvas_logits, logits, window_start,
                                                        axis=1)
    return canvas_logits, cache

  period = settings.cache_refresh
  refresh = local_step % period == 0 if period > 0 else local_step == 0
  return (*jax.lax.cond(refresh, whole_rows, window, cache), refresh)


def _decode_loop(graphdef, params, base, segment_ids, starts, canvas, active, steps_per_block,
                 key, speech, *, plan: Plan):
  """The compiled loop. base/segment_ids/starts: [R] forward rows (R = B, or 2B with CFG: the
  unconditional rows after the conditional ones); canvas/active: [B]; speech: the rows'
  continuous speech input (`speech_inputs`), or {}."""
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
    canvas, block, local_step, passes, whole_row_passes, loop_steps, cache = state
    cfg_canvas = jnp.concatenate([canvas, canvas]) if plan.settings.cfg > 0 else canvas
    window_start = jnp.minimum(block_start[block], n - plan.window)
    logits, cache, whole_rows = _canvas_logits(
        model, _rows_with_canvas(base, cfg_canvas, starts), segment_ids, positions, starts,
        columns, cache, local_step, window_start, plan, speech)
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
    decoding = jnp.any(candidates, axis=-1).astype(jnp.int32)
    passes = passes + decoding
    whole_row_passes = whole_row_passes + decoding * whole_rows
    canvas = jnp.where(commit, tokens, canvas)
    local_step = local_step + 1
    block_done = (local_step >= steps_per_block[block]) | ~jnp.any(masked_in_block(canvas, block))
    block = jnp.where(block_done, block + 1, block)
    local_step = jnp.where(block_done, 0, local_step)
    return canvas, block, local_step, passes, whole_row_passes, loop_steps + 1, cache

  zero, row_zeros = jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32)
  cache = None if plan.settings.cache == "none" else model.init_cache(*base.shape)
  state = (canvas, zero, zero, row_zeros, row_zeros, zero, cache)
  canvas, _, _, passes, whole_row_passes, loop_steps, _ = jax.lax.while_loop(cond, body, state)
  return canvas, passes, whole_row_passes, loop_steps


_EXECUTABLES: dict = {}  # (loop, graphdef, plan, input shapes and shardings) -> compiled loop
_MAX_EXECUTABLES = 64


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


@dataclasses.dataclass(frozen=True)
class DecodeRows:
  """One decode's forward rows, shared by the diffusion and the autoregressive decoders: R = the
  caller's B rows padded to a multiple of the batch shards (padding rows, inactive, repeat row
  0), then with CFG as many unconditional rows. Every row is `prompt + canvas` from column 0,
  right-padded (segment 0, never attended) to one length, so a row's own tokens sit at the same
  columns whether it runs alone or in a batch."""

  graphdef: nnx.GraphDef
  params: nnx.State
  mesh: jax.sharding.Mesh | None
  batch: int  # the caller's rows
  tokens: np.ndarray  # [R, prompt columns + canvas] int32: prompts, then <|endoftext|>
  segment_ids: np.ndarray  # [R, ...] int32: 1 over each row's prompt and canvas
  starts: np.ndarray  # [R] int32: prompt lengths (each row's first canvas column)
  active: np.ndarray  # [padded B] bool: the caller's rows

  @classmethod
  def build(cls, model, vocab: Vocab, prompts: Sequence, settings: DecodeSettings,
            uncond_prompts: Sequence | None) -> DecodeRows | None:
    """Checks the prompts and lays them out; None when there are none."""
    if settings.cfg > 0 and uncond_prompts is None:
      raise ValueError("cfg > 0 needs uncond_prompts (one per prompt)")
    if uncond_prompts is not None and len(uncond_prompts) != len(prompts):
      raise ValueError(f"uncond_prompts has {len(uncond_prompts)} rows, prompts {len(prompts)}")
    rows = _as_prompts(prompts, vocab, "prompts")
    if not rows:
      return None
    uncond = _as_prompts(uncond_prompts, vocab, "uncond_prompts") if settings.cfg > 0 else []
    model_vocab = model.config.vocab_size
    if model_vocab < vocab.size:
      raise ValueError(f"the model's embedding has {model_vocab} rows, fewer than the "
                       f"vocabulary's {vocab.size} ids")
    graphdef, params = nnx.split(model)
    mesh = _model_mesh(params)
    batch, canvas = len(rows), settings.canvas
    batch_shards = 1 if mesh is None else shard_count("batch", mesh)
    padded_batch = -(-batch // batch_shards) * batch_shards
    rows = rows + [rows[0]] * (padded_batch - batch)
    if uncond:
      uncond = uncond + [uncond[0]] * (padded_batch - batch)
    forward_rows = rows + uncond
    prompt_columns = -(-max(map(len, forward_rows)) // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.full((len(forward_rows), prompt_columns + canvas), vocab.pad_id, np.int32)
    segment_ids = np.zeros(tokens.shape, np.int32)
    for r, prompt in enumerate(forward_rows):
      tokens[r, :len(prompt)] = prompt
      segment_ids[r, :len(prompt) + canvas] = 1
    starts = np.asarray([len(prompt) for prompt in forward_rows], np.int32)
    return cls(graphdef, params, mesh, batch, tokens, segment_ids, starts,
               np.arange(padded_batch) < batch)

  def run(self, loop, plan, row_inputs: tuple, other_inputs: tuple) -> tuple[tuple, float]:
    """`loop(graphdef, params, *row_inputs, *other_inputs, plan=plan)` compiled (once per
    loop, plan, shapes and shardings) and run on the model's mesh, its row inputs
    batch-sharded -> (its outputs on the host, the seconds it ran)."""
    if self.mesh is not None:
      spec = logical_to_spec(("batch",), self.mesh)
      row_inputs = tuple(jax.device_put(x, NamedSharding(
          self.mesh, PartitionSpec(*spec, *[None] * (x.ndim - 1)))) for x in row_inputs)
    args = (self.params, *row_inputs, *other_inputs)
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      run = _compiled(loop, self.graphdef, plan, args)
      start = time.perf_counter()
      outputs = jax.block_until_ready(run(*args))
      seconds = time.perf_counter() - start
    return jax.device_get(outputs), seconds

  def result(self, canvases, passes, loop_steps, seconds: float,
             whole_row_passes=None) -> SampleResult:
    whole = None if whole_row_passes is None else np.asarray(whole_row_passes)[:self.batch]
    return SampleResult([np.asarray(canvases[r]).copy() for r in range(self.batch)],
                        np.asarray(passes)[:self.batch], int(loop_steps), seconds, whole)


def _compiled(loop, graphdef, plan, args):
  """The compiled loop for these inputs, compiled ahead of time so decode time is measurable."""
  signature = tuple((x.shape, x.dtype, getattr(x, "sharding", None))
                    for x in jax.tree.leaves(args))
  key = (loop, graphdef, plan, signature)
  if key not in _EXECUTABLES:
    if len(_EXECUTABLES) >= _MAX_EXECUTABLES:
      _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
    jitted = jax.jit(functools.partial(loop, graphdef, plan=plan))
    _EXECUTABLES[key] = jitted.lower(*args).compile()
  return _EXECUTABLES[key]


# The caches' prefill reads token ids only; splicing speech into it is not built.
SPEECH_CACHE_REFUSAL = "continuous speech input decodes without a KV cache (cache none)"
# Speech clips' frames round up to this in a decode's speech input: a few shapes to compile.
SPEECH_FRAMES_BUCKET = 32


def speech_inputs(rows: DecodeRows, speech: Sequence[Sequence[np.ndarray]] | None) -> dict:
  """The model's continuous speech input for the forward rows: speech_features [R, K, T, F]
  and speech_lengths [R, K], prompt b's clips (features [frames, F]) in row b, row 0's in the
  padding rows, none in the unconditional rows (CFG drops the condition); {} without speech."""
  if speech is None or not any(len(clips) for clips in speech):
    return {}
  if len(speech) != rows.batch:
    raise ValueError(f"speech for {len(speech)} prompts, there are {rows.batch}")
  clips = max(len(row) for row in speech)
  frames = max(len(clip) for row in speech for clip in row)
  frames = -(-frames // SPEECH_FRAMES_BUCKET) * SPEECH_FRAMES_BUCKET
  width = next(clip.shape[1] for row in speech for clip in row)
  features = np.zeros((len(rows.tokens), clips, frames, width), np.float32)
  lengths = np.zeros((len(rows.tokens), clips), np.int32)
  for r in range(len(rows.active)):
    for k, clip in enumerate(speech[r if r < rows.batch else 0]):
      features[r, k, :len(clip)] = clip
      lengths[r, k] = len(clip)
  return dict(speech_features=features, speech_lengths=lengths)


def decode(model, vocab: Vocab, prompts: Sequence, settings: DecodeSettings, *,
           uncond_prompts: Sequence | None = None,
           speech: Sequence[Sequence[np.ndarray]] | None = None) -> SampleResult:
  """Decodes `settings.canvas` tokens after each prompt (`sample`'s rules), returning each
  row's canvas with its forward passes and the loop's step count. `speech`: each prompt's
  continuous speech clips (features [frames, F]), which its `<|context_of_audio|>`
  placeholders take, in order."""
  for offset, token in settings.prefill:
    vocab.check_ids([token], f"prefill at offset {offset}")
    if token == vocab.mask_id:
      raise ValueError(f"prefill at offset {offset}: the mask id cannot be prefilled")
  rows = DecodeRows.build(model, vocab, prompts, settings, uncond_prompts)
  if rows is None:
    return SampleResult.empty()
  speech_input = speech_inputs(rows, speech)
  if speech_input and settings.cache != "none":
    raise ValueError(SPEECH_CACHE_REFUSAL)
  start_canvas = np.full((len(rows.active), settings.canvas), vocab.mask_id, np.int32)
  for offset, token in settings.prefill:
    start_canvas[:, offset] = token
  blocks = block_plan(settings.canvas, settings.steps, settings.block_size)
  steps_per_block = jnp.asarray([block_steps for _, _, block_steps in blocks], jnp.int32)
  (out, passes, whole_row_passes, loop_steps), seconds = rows.run(
      _decode_loop, Plan.of(settings, vocab),
      (rows.tokens, rows.segment_ids, rows.starts, start_canvas, rows.active),
      (steps_per_block, jax.random.key(settings.seed), speech_input))
  return rows.result(out, passes, loop_steps, seconds, whole_row_passes)


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
  position_penalty, cfg, block_size, threshold, prefill, seed, cache, cache_refresh). cfg > 0
  needs `uncond_prompts` (one per prompt), whose rows hold the same canvas as the conditional
  ones. block_size > 0 decodes blocks left to right; threshold commits every masked position
  whose confidence is above it (at least one per step; the confidence of `alg`: a probability,
  a margin, or a negative entropy), with `steps` as the ceiling; prefill: {canvas offset: token
  id} written before decoding; cache="prefix" reuses the prompt's keys and values between
  refreshes, cache="dual" those of every column outside the current block (the module's
  docstring). A row's tokens never depend on the other rows at
  temperature 0.
  """
  return sample_with_stats(model, vocab, prompts, uncond_prompts=uncond_prompts,
                           **settings).canvases
