"""Stages that freeze part of the model, through the training loop: frozen parameters come out
bit-identical, have no optimizer state, survive checkpoints and resume, and `grad_norm` covers
the trainable parameters only. The speech encoder is frozen unless a stage unfreezes it."""

import jax
import numpy as np
import pytest
from flax import nnx

from train_helpers import tiny_config
from omnijax.config import CONFIG_ROOT, TASKS, MeshConfig, load_yaml_tree
from omnijax.model.build import create_model
from omnijax.sharding import make_mesh, path_str
from omnijax.train.checkpoints import Checkpoints
from omnijax.train.loop import train
from omnijax.train.metrics import read_metrics
from omnijax.train.program import build_train_program
from omnijax.train.state import StateLayout

# Stage 1 trains only the output head, stage 2 only the transformer layers.
FREEZING = ('train.stages.stage1.trainable=["lm_head"]',
            'train.stages.stage2.trainable=["layers/.*"]')


def flat(tree) -> dict:
  return {path_str(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def restore(config, workdir, step):
  """(params, opt_state) of checkpoint `step` of the run in `workdir`."""
  layout = StateLayout.create(config, make_mesh(config.mesh))
  checkpoints = Checkpoints(workdir / "checkpoints", keep=None, read_only=True)
  _, state, _, _ = checkpoints.restore(step, lambda meta: layout.checkpoint_target(config, meta))
  checkpoints.close()
  return flat(jax.device_get(state.params)), jax.device_get(state.opt_state)


def moments(opt_state) -> list[np.ndarray]:
  """The optimizer's per-parameter arrays (AdamW's mu and nu, Muon's momentum), counters and
Muon's Newton-Schulz coefficients left out."""
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if np.ndim(leaf) > 0 and "ns_coeffs" not in jax.tree_util.keystr(path)]


def buffers(name: str, value) -> list[tuple]:
  """The moment shapes a trained parameter should have under the toy recipe's Muon: one
  momentum for a projection kernel ([in, out], or [layers, in, out] when scanned), AdamW's two
  for everything else."""
  muon = name.endswith("/kernel") and np.ndim(value) in (2, 3)
  return [np.shape(value)] * (1 if muon else 2)


@pytest.fixture(scope="module")
def frozen_run(toy_data, tmp_path_factory):
  """Stage 1, then stage 2 stopped at step 6 and resumed to its end (step 8); and the same
  eight steps uninterrupted."""
  config = tiny_config(toy_data, *FREEZING)
  resumed, straight = tmp_path_factory.mktemp("resumed"), tmp_path_factory.mktemp("straight")
  initial = flat(nnx.to_pure_dict(nnx.state(create_model(config.model, make_mesh(config.mesh),
                                                         seed=config.train.seed))))
  train(config, resumed, max_steps=6)
  train(config, resumed, max_steps=8)
  train(config, straight, max_steps=8)
  return (config, resumed, straight, initial, restore(config, resumed, 4),
          restore(config, resumed, 8))


def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state(frozen_run):
  _, _, _, initial, (stage1, stage1_opt), (stage2, stage2_opt) = frozen_run
  for name, value in initial.items():
    if name == "lm_head":
      assert not np.array_equal(stage1[name], value)
    else:
      np.testing.assert_array_equal(stage1[name], value, err_msg=name)
  # AdamW's two moments of the one trainable parameter (lm_head), nothing for the frozen ones.
  assert [m.shape for m in moments(stage1_opt)] == [initial["lm_head"].shape] * 2
  for name, value in stage1.items():
    if name.startswith("layers/"):
      assert not np.array_equal(stage2[name], value), name
    else:
      np.testing.assert_array_equal(stage2[name], value, err_msg=name)
  layer_buffers = sorted(shape for k, v in initial.items() if k.startswith("layers/")
                         for shape in buffers(k, v))
  assert sorted(m.shape for m in moments(stage2_opt)) == layer_buffers


def test_freezing_resumes_exactly(frozen_run):
  _, resumed, straight, *_ = frozen_run
  losses = lambda workdir: {r["step"]: r["loss"] for r in read_metrics(workdir)}
  assert sorted(losses(resumed)) == list(range(1, 9))
  assert losses(resumed) == losses(straight)


def test_grad_norm_covers_the_trainable_parameters_only(frozen_run, toy_data, tmp_path):
  """Same weights and batch, three trainable sets: the norms add up as squares."""
  _, _, straight, *_ = frozen_run
  norms = {"head": read_metrics(straight)[0]["grad_norm"]}  # stage 1 trains lm_head only
  for name, trainable in (("all", '[".*"]'), ("rest", '["(?!lm_head$).*"]')):
    config = tiny_config(toy_data, f"train.stages.stage1.trainable={trainable}")
    train(config, tmp_path / name, max_steps=1)
    norms[name] = read_metrics(tmp_path / name)[0]["grad_norm"]
  assert 0 < norms["head"] < norms["all"] and 0 < norms["rest"] < norms["all"]
  assert norms["head"] ** 2 + norms["rest"] ** 2 == pytest.approx(norms["all"] ** 2, rel=1e-4)


# --- the speech encoder: frozen by default, the projector trains -----------------------------

SPEECH_TINY = CONFIG_ROOT / "model" / "speech" / "tiny.yaml"


def speech_batch(config, frames: int = 6):
  """An ASR-shaped batch built by hand: <|begin_of_audio|> + (frames + 4) placeholders +
  <|end_of_audio|> in each row's prompt, text after; one clip of `frames` frames per row (the
  last row's clip shorter)."""
  vocab = config.model.vocab.build()
  rows, length = config.data.global_batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab.text_size, size=(rows, length)).astype(np.int32)
  prompt = [vocab.begin_audio_id, *[vocab.audio_context_id] * (frames + 4), vocab.end_audio_id]
  tokens[:, 1:1 + len(prompt)] = prompt
  response_mask = np.zeros((rows, length), np.int32)
  response_mask[:, 1 + len(prompt) + 2:] = 1
  lengths = np.full((rows, 1), frames, np.int32)
  lengths[-1] = frames - 2
  return dict(tokens=tokens, segment_ids=np.ones_like(tokens),
              positions=np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy(),
              response_mask=response_mask,
              task_ids=np.full_like(tokens, TASKS.index("asr")),
              speech_features=rng.standard_normal((rows, 1, frames, 560)).astype(np.float32),
              speech_lengths=lengths)


def speech_steps(config, steps=3):
  """(initial params, params after `steps` steps on one speech batch, opt_state), one device."""
  mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  program = build_train_program(config, "stage1", mesh=mesh)
  initial = nnx.to_pure_dict(nnx.state(create_model(config.model, seed=0)))
  # A copy: the step donates its state.
  state = program.init_state(jax.device_put(jax.tree.map(np.array, initial),
                                            program.shardings.params), np.int32(0))
  batch = speech_batch(config)
  with jax.set_mesh(mesh):
    for _ in range(steps):
      state, metrics = program.step(state, batch)
      assert np.isfinite(metrics["loss"])
  return flat(initial), flat(jax.device_get(state.params)), jax.device_get(state.opt_state)


def speech_config(toy_data, *overrides):
  encoder = load_yaml_tree(SPEECH_TINY)["model"]["speech_encoder"]
  return tiny_config(toy_data, f"model.speech_encoder={encoder}", "data.seq_len=48",
                     "data.global_batch_size=2", *overrides)


@pytest.mark.slow  # ~30 s each: the train step with the encoder compiles
@pytest.mark.parametrize("freeze", [True, False])
def test_the_speech_encoder_is_frozen_by_default_and_the_projector_trains(toy_data, freeze):
  config = speech_config(toy_data, f"train.stages.stage1.freeze_speech_encoder={freeze}")
  initial, trained, opt_state = speech_steps(config)
  encoder = {name for name in initial if name.startswith("speech_encoder/")}
  projector = {name for name in initial if name.startswith("speech_projector/")}
  assert encoder and projector
  for name in encoder:
    assert np.array_equal(trained[name], initial[name]) == freeze, name
  for name in projector | {"embed_tokens", "lm_head"}:
    assert not np.array_equal(trained[name], initial[name]), name
  # The optimizer's moments for every trainable parameter; none for a frozen encoder.
  trainable = sorted(shape for name in initial if not (freeze and name in encoder)
                     for shape in buffers(name, initial[name]))
  assert sorted(m.shape for m in moments(opt_state)) == trainable


def _dot_products(jaxpr) -> int:
  """dot_general equations in a jaxpr and every jaxpr nested in it (jit, scan, cond branches)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "dot_general"
    for value in eqn.params.values():
      for inner in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          count += _dot_products(inner)
  return count


def test_a_frozen_encoder_has_no_backward_pass(toy_data):
  """Frozen parameters enter the model behind stop_gradient: the step traced with the encoder
  frozen lacks the encoder's gradient matmuls that the unfrozen one has."""
  counts = {}
  for freeze in (True, False):
    config = speech_config(toy_data, f"train.stages.stage1.freeze_speech_encoder={freeze}")
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    program = build_train_program(config, "stage1", mesh=mesh)
    with jax.set_mesh(mesh):
      counts[freeze] = _dot_products(jax.make_jaxpr(program.step)(
          program.abstract_state(), speech_batch(config)).jaxpr)
  # Per encoder block: q, k, v, out and two FFN matmuls forward; the backward pass adds at least
  # the weight gradients of those six.
  assert counts[False] - counts[True] >= 6 * 3, counts


@pytest.mark.slow
def test_a_later_stage_may_unfreeze_the_encoder(toy_data, tmp_path):
  """Stage 1 keeps the encoder frozen, stage 2 unfreezes it: the optimizer state is rebuilt with
  the encoder's moments at the stage boundary (data without audio trains the text path)."""
  # Data parallel: the tiny encoder's 560-wide input block is a quarter of this tiny model's
  # bytes and does not shard over fsdp (sharding.RULES: speech_features).
  config = speech_config(toy_data, "train.stages.stage2.freeze_speech_encoder=false",
                         "data.seq_len=192", "data.global_batch_size=8", "mesh.data=-1",
                         "mesh.fsdp=1")
  train(config, tmp_path, max_steps=6)
  (stage1, stage1_opt), (stage2, stage2_opt) = restore(config, tmp_path, 4), restore(
      config, tmp_path, 6)
  assert sum(v.size for k, v in stage1.items() if k.startswith("speech_encoder/")) == \
      config.model.speech_encoder.param_count()
  moment_sizes = {k: sum(np.prod(shape, dtype=int) for shape in buffers(k, v))
                  for k, v in stage1.items()}
  # The moments: for all but the encoder in stage 1, for everything in stage 2.
  assert sum(m.size for m in moments(stage1_opt)) == sum(
      size for k, size in moment_sizes.items() if not k.startswith("speech_encoder/"))
  assert sum(m.size for m in moments(stage2_opt)) == sum(moment_sizes.values())
