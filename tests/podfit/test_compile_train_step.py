"""`omnijax compile`: the sharded train step, Pallas attention included, compiles for real TPU
topologies on this CPU-only machine (needs libtpu; CI installs it), and reports whether it fits."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from omnijax.config import ConfigError, load_config
from omnijax.data.pipeline import BATCH_FIELDS
from omnijax.model.build import abstract_model
from omnijax.podfit.aot import DOES_NOT_FIT_EXIT, GIB, compile_train_step, out_of_memory
from omnijax.train import flops

TINY = pathlib.Path(__file__).parents[1] / "train" / "tiny_experiment.yaml"


@pytest.mark.libtpu
@pytest.mark.parametrize("topology,attention", [
    ("topology/v5e-8.yaml", "pallas"),
    ("topology/v5p-8.yaml", "pallas"),
    ("topology/v5e-8.yaml", "splash"),
    ("topology/v5p-128.yaml", "xla"),
    ("topology/v5e-8.yaml", "auto"),  # resolves to pallas for the TPU mesh, on this CPU host
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
  if attention in ("pallas", "splash", "auto"):
    assert report.custom_calls >= 3
  else:
    assert report.custom_calls == 0
  assert report.temp_bytes > 0 and report.code_bytes > 0
  # The compiler's arguments are the donated state (fp32 parameters and AdamW's two moments,
  # sharded as the rules table says: `params_per_chip` elements each) and this chip's rows of
  # the batch. TPU layouts pad this tiny model's small shards to whole (8, 128) tiles (1.6x on
  # v5e-8, 2.4x on v5p-128 measured), so the window is that wide: a missing optimizer moment
  # falls below it, a state replicated where the rules shard it (8x or more here) above it.
  batch_shards = report.mesh["data"] * report.mesh["fsdp"]
  batch_bytes = len(BATCH_FIELDS) * 64 * 256 * 4 // batch_shards
  state_bytes = 3 * 4 * report.params_per_chip
  assert state_bytes + batch_bytes <= report.argument_bytes <= 3 * (state_bytes + batch_bytes)
  assert report.fits and report.hbm_bytes_per_chip in (16 * GIB, 95 * GIB)
  # The compiled peak holds at least the analytic minimum, within a plausible overhead.
  assert 1 < report.ratio_to_analytic_min < 50
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


REPORT_FIELDS = {"fits", "hbm_bytes_per_chip", "peak_bytes_per_chip", "argument_bytes", "temp_bytes",
                 "analytic_min_bytes_per_chip", "ratio_to_analytic_min", "params_per_chip",
                 "tflops_per_chip_per_step", "compile_seconds", "predicted_step_seconds"}


def _compile_cli(tmp_path, *overrides):
  experiment = tmp_path / "experiment.yaml"
  experiment.write_text(f"defaults: [{TINY}, topology/v5e-8.yaml]\n")
  out = tmp_path / "report.json"
  result = subprocess.run([sys.executable, "-m", "omnijax.cli", "compile", "--config",
                           str(experiment), "--out", str(out), *overrides],
                          capture_output=True, text=True, timeout=300)
  return result, json.loads(out.read_text())


@pytest.mark.libtpu
def test_compile_writes_a_machine_readable_report(tmp_path):
  result, report = _compile_cli(tmp_path, "data.global_batch_size=8", "--stage", "3")
  assert result.returncode == 0, result.stderr
  assert REPORT_FIELDS <= set(report) and report["fits"] is True and report["stage"] == "stage3"
  assert report["chips"] == 8 and report["device_kind"] == "TPU v5 lite"
  # 8 rows x 192 tokens over 8 chips, at the analytic FLOPs per token.
  from omnijax.config import load_config
  from omnijax.train.flops import training_flops_per_token
  model = load_config(TINY).model
  assert report["tflops_per_chip_per_step"] == pytest.approx(
      192 * training_flops_per_token(model, 192) / 1e12)
  assert report["predicted_step_seconds"] == pytest.approx(
      report["tflops_per_chip_per_step"] * 1e12 / 197e12)
  assert "fits: peak" in result.stdout


@pytest.mark.libtpu
def test_out_of_memory_is_a_does_not_fit_verdict_with_the_numbers(tmp_path):
  # Reference attention on 32k-token rows: the [heads, L, L] scores alone need ~100 GiB a chip.
  result, report = _compile_cli(tmp_path, "data.global_batch_size=8", "data.seq_len=32768",
                                "model.attention=xla")
  assert result.returncode == DOES_NOT_FIT_EXIT
  assert "Traceback" not in result.stderr and "DOES NOT FIT" in result.stdout
  assert report["fits"] is False and REPORT_FIELDS <= set(report)
  assert report["peak_bytes_per_chip"] > 16 * GIB > report["argument_bytes"] > 0
  assert report["ratio_to_analytic_min"] > 1 and "HBM" in report["error"]


def test_only_hbm_exhaustion_counts_as_out_of_memory():
  total = out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran "
                                     "out of memory in memory space hbm. Used 20.25G of 15.75G "
                                     "hbm. Exceeded hbm capacity by 4.50G."))
  assert total.total_bytes == int(20.25 * GIB) and total.temp_bytes is None
  temporaries = out_of_memory(RuntimeError(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (110.40G) exceeds available HBM (15.75G)."))
  assert temporaries.temp_bytes == int(110.40 * GIB) and temporaries.total_bytes is None
  assert out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem. "
                                    "Used 256.00M of 128.00M vmem")) is None
  assert out_of_memory(ValueError("bad block shape")) is None


@pytest.mark.libtpu
def test_speech_batches_compile_with_the_encoder_and_report_its_share(tmp_path):
  experiment = tmp_path / "experiment.yaml"
  experiment.write_text(f"defaults: [{TINY}, model/speech/tiny.yaml, topology/v5e-8.yaml]\n")
  config = load_config(experiment, ["data.global_batch_size=8", "data.speech_clips=2",
                                    "data.speech_frames=20"])
  report, compiled = compile_train_step(config, stage="3")
  # The batch carries two clips of 20 frames of 560 features per row, split over the batch axes
  # like the tokens, and the step runs the encoder on them (behind its no-clip lax.cond).
  (state_shardings, batch_shardings), _ = compiled.input_shardings
  features = batch_shardings["speech_features"]
  assert features.shard_shape((8, 2, 20, 560)) == (2, 2, 20, 560)
  assert batch_shardings["speech_lengths"].shard_shape((8, 2)) == (2, 2)
  assert "conditional" in compiled.as_text()
  # The encoder's share: its parameters (frozen: 4 bytes each, no gradient or moments) and the
  # projector's (trained: parameter, gradient and the toy recipe's Muon momentum, 12 bytes, for
  # its kernels; AdamW's two moments, 16 bytes, for its norm), as the rules table shards them.
  _, abstract = abstract_model(config.model)
  shapes = nnx.to_pure_dict(abstract)

  def per_chip(module, kernels):
    return sum(math.prod(sharding.shard_shape(value.shape)) for (path, value), sharding in zip(
        jax.tree_util.tree_leaves_with_path(shapes[module]),
        jax.tree.leaves(state_shardings.params[module]))
        if kernels is None or (jax.tree_util.keystr(path).endswith("['kernel']") == kernels))

  encoder, projector = per_chip("speech_encoder", None), per_chip("speech_projector", None)
  assert config.train.optimizer.kind == "muon"
  assert report.speech_params_per_chip == encoder + projector
  kernels, others = per_chip("speech_projector", True), per_chip("speech_projector", False)
  assert report.speech_state_bytes_per_chip == 4 * encoder + 12 * kernels + 16 * others
  # Every large encoder parameter is sharded: well under the whole encoder on each chip.
  assert encoder < 0.3 * config.model.speech_encoder.param_count()
  # One row per chip: its speech FLOPs beside its 192 tokens'.
  assert report.speech_tflops_per_chip_per_step == pytest.approx(
      flops.speech_flops_per_row(config, config.train.stages["stage3"]) / 1e12)
  assert report.tflops_per_chip_per_step == pytest.approx(
      192 * flops.training_flops_per_token(config.model, 192) / 1e12
      + report.speech_tflops_per_chip_per_step)
  assert report.fits and "; speech encoder + projector: " in report.describe()
