"""`omnijax compile`: the sharded train step, Pallas attention included, compiles for real TPU
topologies on this CPU-only machine (needs libtpu; CI installs it)."""

import pathlib

import pytest
from jax.sharding import PartitionSpec as P

from omnijax.aot import compile_train_step
from omnijax.config import ConfigError, load_config

TINY = pathlib.Path(__file__).parents[1] / "train" / "tiny_experiment.yaml"


@pytest.mark.libtpu
@pytest.mark.parametrize("topology,attention", [
    ("topology/v5e-8.yaml", "pallas"),
    ("topology/v5p-8.yaml", "pallas"),
    ("topology/v5e-8.yaml", "splash"),
    ("topology/v5p-128.yaml", "xla"),
])
def test_train_step_compiles_for_tpu(tmp_path, topology, attention):
  experiment = tmp_path / "experiment.yaml"
  experiment.write_text(f"defaults: [{TINY}, {topology}]\n")
  config = load_config(experiment, [f"model.attention={attention}", "data.global_batch_size=64",
                                    "data.seq_len=256"])
  report, compiled = compile_train_step(config)
  assert report.device_kind.startswith("TPU")
  assert report.mesh["tensor"] == config.mesh.tensor
  # Kernels inside the scanned layer: forward, dQ and dK/dV, compiled by Mosaic.
  if attention in ("pallas", "splash"):
    assert report.custom_calls >= 3
  else:
    assert report.custom_calls == 0
  assert report.argument_bytes > 0 and report.temp_bytes > 0 and report.code_bytes > 0
  # The compiled executable takes the batch split over the batch axes and the parameters
  # sharded as the rules table says.
  (state_shardings, batch_shardings), _ = compiled.input_shardings
  batch_axes = tuple(axis for axis in ("data", "fsdp") if report.mesh[axis] > 1)
  assert batch_shardings["tokens"].spec[0] in (batch_axes, batch_axes[0])
  q_kernel = state_shardings.params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q_kernel.spec == P(None, "fsdp", "tensor")


@pytest.mark.libtpu
def test_bad_topology_names_fail_clearly():
  config = load_config(TINY, ["topology.name=v9z:1x1"])
  with pytest.raises(ConfigError, match="topology.name='v9z:1x1': libtpu cannot describe it"):
    compile_train_step(config)
