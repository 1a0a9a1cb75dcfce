"""Ahead-of-time compilation of the train step for a real TPU topology, on any host.

With libtpu installed, `jax.experimental.topologies` describes the devices of e.g. a v5p-128
slice without owning one; the train step is lowered against ShapeDtypeStructs sharded on that
mesh and compiled by the real TPU compiler. Out-of-memory, illegal kernel block shapes and
sharding mistakes fail here, before a pod is rented.

`omnijax compile --out report.json` writes the per-chip verdict a script can read: whether the
step fits the chip's HBM, its compiled peak against the analytic minimum (omnijax.podfit.memory)
and the analytic FLOPs. Running out of HBM is a verdict, not an error: the compiler's refusal is
turned into `fits: false` with the memory it asked for.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import numpy as np

from omnijax.config import Config, ConfigError
from omnijax.data.pipeline import BATCH_FIELDS
from omnijax.model.speech import SPEECH_INPUTS
from omnijax.podfit.memory import analytic_minimum
from omnijax.sharding import make_mesh
from omnijax.train import flops
from omnijax.train.program import build_train_program


class LibtpuMissingError(RuntimeError):
  """Compiling for a TPU topology needs libtpu (the TPU compiler), which is not installed."""


def _require_libtpu(topology_name: str) -> None:
  # Without this check a missing compiler reads like a misspelt topology name.
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise LibtpuMissingError(f"compiling for topology.name={topology_name!r} needs libtpu, the "
                             "TPU compiler, which is not installed: pip install -e '.[tpu]'") \
        from None


def topology_devices(config: Config) -> list:
  """Compile-only TPU devices of `config.topology`."""
  topology = config.topology
  if not topology.name:
    raise ConfigError("topology.name is empty: set a TPU topology, e.g. topology.name=v5e:2x4")
  _require_libtpu(topology.name)
  from jax.experimental import topologies

  kwargs = {}
  if topology.chip_config_name:
    kwargs["chip_config_name"] = topology.chip_config_name
  if topology.chips_per_host_bounds:
    kwargs["chips_per_host_bounds"] = tuple(topology.chips_per_host_bounds)
  if topology.wrap:
    kwargs["wrap"] = tuple(topology.wrap)
  try:
    description = topologies.get_topology_desc(topology_name=topology.name, platform="tpu",
                                               num_slices=topology.num_slices, **kwargs)
  except Exception as e:  # libtpu reports bad names as assorted runtime errors
    raise ConfigError(f"topology.name={topology.name!r}: libtpu cannot describe it ({e})") from None
  return list(description.devices)


GIB = 2 ** 30
# HBM per chip (vendors' spec sheets), keyed by `device.device_kind` ("TPU v5" is v5p).
HBM_BYTES_BY_DEVICE_KIND = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,
    "TPU v5": 95 * GIB,
    "TPU v6 lite": 32 * GIB,
}
# The TPU compiler's out-of-memory messages: the total ("Used 20.25G of 15.75G hbm") or the
# temporaries alone ("the total memory required for HLO temporaries (16.00G) exceeds available
# HBM (15.75G)").
_OOM_TOTAL = re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of [\d.]+[KMGT]?i?B? hbm", re.IGNORECASE)
_OOM_TEMPORARIES = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)i?B?\)", re.IGNORECASE)
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """What the compiler said when the step did not fit: total or temporaries (bytes, or None)."""

  message: str
  total_bytes: int | None = None
  temp_bytes: int | None = None


def out_of_memory(error: Exception) -> OutOfMemory | None:
  """The figures of a TPU compiler out-of-HBM error; None if `error` is something else."""
  message = str(error).strip()
  # VMEM exhaustion is a kernel's block sizes, not the model's fit: that stays an error.
  if "RESOURCE_EXHAUSTED" not in message or "hbm" not in message.lower():
    return None
  figures = {}
  for field, pattern in (("total_bytes", _OOM_TOTAL), ("temp_bytes", _OOM_TEMPORARIES)):
    match = pattern.search(message)
    if match:
      figures[field] = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
  return OutOfMemory(message.splitlines()[0], **figures)


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-chip figures of one compiled train step (all byte counts per chip).

  When the compiler runs out of HBM, `fits` is False, `argument_bytes` are those of the
  sharded state and batch, and `peak_bytes_per_chip` is what the compiler reported as required
  (the arguments plus its temporaries when it names only those; 0 when it gives no figure).
  """

  topology: str
  device_kind: str
  chips: int
  mesh: dict
  stage: str
  fits: bool
  hbm_bytes_per_chip: int
  peak_bytes_per_chip: int
  argument_bytes: int
  output_bytes: int | None
  temp_bytes: int | None
  code_bytes: int | None
  analytic_min_bytes_per_chip: int
  analytic_state_bytes_per_chip: int
  analytic_activation_bytes_per_chip: int
  params_per_chip: int
  tflops_per_chip_per_step: float
  # Analytic FLOPs / the chip's peak: the step time at 100% MFU (None for an unknown chip).
  predicted_step_seconds: float | None
  compile_seconds: float
  custom_calls: int
  error: str | None = None
  # The speech encoder's and projector's share (0 without an encoder): their parameters and
  # training state per chip (a frozen encoder: parameters only), their analytic FLOPs.
  speech_params_per_chip: int = 0
  speech_state_bytes_per_chip: int = 0
  speech_tflops_per_chip_per_step: float = 0.0

  @property
  def ratio_to_analytic_min(self) -> float:
    return self.peak_bytes_per_chip / self.analytic_min_bytes_per_chip

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), ratio_to_analytic_min=self.ratio_to_analytic_min)

  def describe(self) -> str:
    verdict = "fits" if self.fits else "DOES NOT FIT"
    temporaries = ("" if self.temp_bytes is None else
                   f" (arguments {self.argument_bytes / GIB:.2f} GiB, temporaries "
                   f"{self.temp_bytes / GIB:.2f} GiB)")
    step_time = ("" if self.predicted_step_seconds is None else
                 f"; predicted step {self.predicted_step_seconds:.2f} s at peak FLOP/s")
    return (f"{self.topology} ({self.chips} x {self.device_kind}), mesh {self.mesh}, stage "
            f"{self.stage}: {verdict}: peak {self.peak_bytes_per_chip / GIB:.2f} GiB of "
            f"{self.hbm_bytes_per_chip / GIB:.2f} GiB HBM per chip{temporaries}, "
            f"{self.ratio_to_analytic_min:.2f}x the analytic minimum "
            f"{self.analytic_min_bytes_per_chip / GIB:.2f} GiB; {self.params_per_chip:,} "
            f"parameters and {self.tflops_per_chip_per_step:.2f} TFLOP per chip per step"
            f"{step_time}; compiled in {self.compile_seconds:.1f} s, "
            f"{self.custom_calls} Mosaic kernel calls{self._describe_speech()}")

  def _describe_speech(self) -> str:
    if not self.speech_params_per_chip:
      return ""
    return (f"; speech encoder + projector: {self.speech_params_per_chip:,} parameters and "
            f"{self.speech_state_bytes_per_chip / GIB:.2f} GiB of state per chip, "
            f"{self.speech_tflops_per_chip_per_step:.2f} TFLOP per chip per step "
            f"({self.speech_tflops_per_chip_per_step / self.tflops_per_chip_per_step:.1%})")


def _per_chip_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def abstract_batch(config: Config, sharding) -> dict:
  """The train step's batch as sharded ShapeDtypeStructs: the packed rows' fields and, for a
  model with a speech encoder, its speech inputs (features [rows, data.speech_clips,
  data.speech_frames, feature_size] fp32 as the front end writes them, lengths [rows, clips])."""
  rows = config.data.global_batch_size
  batch = {name: jax.ShapeDtypeStruct((rows, config.data.seq_len), np.int32, sharding=sharding)
           for name in BATCH_FIELDS}
  encoder = config.model.speech_encoder
  if encoder is not None:
    clips = (rows, config.data.speech_clips)
    features, lengths = SPEECH_INPUTS
    batch[features] = jax.ShapeDtypeStruct(
        (*clips, config.data.speech_frames, encoder.feature_size), np.float32, sharding=sharding)
    batch[lengths] = jax.ShapeDtypeStruct(clips, np.int32, sharding=sharding)
  return batch


def compile_train_step(config: Config, stage: str | None = None) -> tuple[CompileReport, object]:
  """Compiles one train step of `stage` (default: the first) for `config.topology`.

  Returns the report and the compiled executable (None when the step does not fit).
  """
  devices = topology_devices(config)
  mesh = make_mesh(config.mesh, devices)
  program = build_train_program(config, stage, mesh=mesh)
  batch = abstract_batch(config, program.batch_sharding)
  abstract_state = program.abstract_state()
  kind = devices[0].device_kind
  hbm = HBM_BYTES_BY_DEVICE_KIND.get(kind)
  if hbm is None:
    raise ConfigError(f"topology.name={config.topology.name!r}: no HBM size known for "
                      f"{kind!r} (known: {', '.join(HBM_BYTES_BY_DEVICE_KIND)})")
  # Lowering needs the TPU mesh in context (some Mosaic rules read the device kind from it);
  # only lowering: optax's eager init above would otherwise run on compile-only devices.
  start = time.perf_counter()
  compiled, oom = None, None
  try:
    with jax.set_mesh(mesh):
      compiled = program.step.lower(abstract_state, batch).compile()
  except Exception as e:  # the compiler reports OOM as a runtime error; anything else is a bug
    oom = out_of_memory(e)
    if oom is None:
      raise
  seconds = time.perf_counter() - start
  analytic = analytic_minimum(config, mesh, program.stage)
  rows_per_chip = config.data.global_batch_size / len(devices)
  speech_flops = flops.speech_flops_per_row(config, config.train.stages[program.stage])
  tflops = rows_per_chip * config.data.seq_len * flops.training_flops_per_token(
      config.model, config.data.seq_len, speech_flops) / 1e12
  peak_flops = flops.PEAK_FLOPS_BY_DEVICE_KIND.get(kind)
  common = dict(
      topology=config.topology.name, device_kind=kind, chips=len(devices), mesh=dict(mesh.shape),
      stage=program.stage, hbm_bytes_per_chip=hbm, analytic_min_bytes_per_chip=analytic.total_bytes,
      analytic_state_bytes_per_chip=analytic.state_bytes,
      analytic_activation_bytes_per_chip=analytic.activation_bytes,
      params_per_chip=analytic.params_per_chip, tflops_per_chip_per_step=tflops,
      predicted_step_seconds=tflops * 1e12 / peak_flops if peak_flops else None,
      compile_seconds=seconds, speech_params_per_chip=analytic.speech_params_per_chip,
      speech_state_bytes_per_chip=analytic.speech_state_bytes,
      speech_tflops_per_chip_per_step=rows_per_chip * speech_flops / 1e12)
  if oom is not None:
    arguments = _per_chip_bytes((abstract_state, batch))
    peak = (oom.total_bytes if oom.total_bytes is not None else
            arguments + oom.temp_bytes if oom.temp_bytes is not None else 0)
    report = CompileReport(
        fits=False, peak_bytes_per_chip=peak, argument_bytes=arguments, output_bytes=None,
        temp_bytes=oom.temp_bytes, code_bytes=None, custom_calls=0, error=oom.message, **common)
    return report, None
  memory = compiled.memory_analysis()
  # Arguments (state + batch; outputs alias the donated state) + temporaries + code.
  peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes +
          memory.generated_code_size_in_bytes)
  report = CompileReport(
      fits=peak <= hbm, peak_bytes_per_chip=peak, argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes,
      custom_calls=compiled.as_text().count("tpu_custom_call"), **common)
  return report, compiled


# `omnijax compile`'s exit status when the step does not fit (0: fits, 2: config error).
DOES_NOT_FIT_EXIT = 3


def write_report(report: CompileReport, path: str) -> None:
  import json

  from omnijax.files import atomic_write_text

  atomic_write_text(path, json.dumps(report.to_json(), indent=2) + "\n")
