"""omnijax.train.program: the one builder of the jitted, sharded train step."""

from jax.sharding import PartitionSpec as P

from train_helpers import tiny_config
from omnijax.train.program import build_train_program


def test_one_program_builder_serves_every_stage(toy_data):
  config = tiny_config(toy_data)
  program = build_train_program(config, "2")
  assert program.stage == "stage2"
  assert program.batch_sharding.spec == P("fsdp", None)
  state = program.abstract_state()
  assert state.params["embed_tokens"].sharding.spec == P(None, "fsdp")
  assert build_train_program(config).stage == "stage1"
