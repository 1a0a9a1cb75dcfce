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


@pytest.mark.libtpu
def test_train_step_compiles_for_two_slices_with_data_parallelism_over_dcn(tmp_path):
  experiment = tmp_path / "experiment.yaml"
  experiment.write_text(f"defaults: [{TINY}, topology/v5e-8.yaml]\n")
  config = load_config(experiment, ["topology.num_slices=2", "data.global_batch_size=32",
                                    "data.seq_len=256"])
  report, compiled = compile_train_step(config)
  # Each v5e-8 slice: fsdp 4 x tensor 2 over ICI; the two slices: data 2 over DCN.
  assert report.mesh == {"data": 2, "fsdp": 4, "tensor": 2}
  (state_shardings, batch_shardings), _ = compiled.input_shardings
  mesh = batch_shardings["tokens"].mesh
  for index, row in enumerate(mesh.devices):
    assert {device.slice_index for device in row.flat} == {index}
  # The rules table maps onto the hybrid mesh unchanged: batch over data (= slices) and fsdp,
  # parameters FSDP within a slice and replicated across slices.
  assert batch_shardings["tokens"].spec[0] == ("data", "fsdp")
  q_kernel = state_shardings.params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q_kernel.spec == P(None, "fsdp", "tensor")


def test_dcn_axes_are_checked():
  with pytest.raises(ConfigError, match="at most one dcn_ axis may be -1"):
    load_config(TINY, ["mesh.dcn_fsdp=-1"])
  with pytest.raises(ConfigError, match="mesh.dcn_tensor=0: expected a positive size"):
    load_config(TINY, ["mesh.dcn_tensor=0"])
  from omnijax.sharding import make_mesh
  with pytest.raises(ConfigError, match=r"mesh dcn_.* needs 2 slices but 1 are available"):
    make_mesh(load_config(TINY, ["mesh.dcn_data=2"]).mesh)
