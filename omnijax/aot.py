"""Ahead-of-time compilation of the train step for a real TPU topology, on any host.

With libtpu installed, `jax.experimental.topologies` describes the devices of e.g. a v5p-128
slice without owning one; the train step is lowered against ShapeDtypeStructs sharded on that
mesh and compiled by the real TPU compiler. Out-of-memory, illegal kernel block shapes and
sharding mistakes fail here, before a pod is rented. `omnijax compile` prints the per-device
memory analysis.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from omnijax.config import Config, ConfigError
from omnijax.data.pipeline import BATCH_FIELDS
from omnijax.runtime import build_train_program
from omnijax.sharding import make_mesh
from omnijax.train import flops


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


@dataclasses.dataclass(frozen=True)
class CompileReport:
  topology: str
  device_kind: str
  mesh: dict
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  code_bytes: int
  custom_calls: int
  flops_per_step_per_device: float

  @property
  def peak_bytes(self) -> int:
    """Arguments (state + batch, donated so outputs alias them) + temporaries + code."""
    return self.argument_bytes + self.temp_bytes + self.code_bytes

  def describe(self) -> str:
    gib = 2 ** 30
    return (f"{self.topology} ({self.device_kind}), mesh {self.mesh}: compiled in "
            f"{self.compile_seconds:.1f} s; per device: arguments {self.argument_bytes / gib:.2f}"
            f" GiB, temporaries {self.temp_bytes / gib:.2f} GiB, code "
            f"{self.code_bytes / 2**20:.1f} MiB, total {self.peak_bytes / gib:.2f} GiB; "
            f"{self.custom_calls} Mosaic kernel calls; analytic "
            f"{self.flops_per_step_per_device / 1e12:.2f} TFLOP per step per device")


def compile_train_step(config: Config, stage: str | None = None) -> tuple[CompileReport, object]:
  """Compiles one train step of `stage` (default: the first) for `config.topology`."""
  devices = topology_devices(config)
  mesh = make_mesh(config.mesh, devices)
  program = build_train_program(config, stage, mesh=mesh)
  shape = (config.data.global_batch_size, config.data.seq_len)
  batch = {name: jax.ShapeDtypeStruct(shape, np.int32, sharding=program.batch_sharding)
           for name in BATCH_FIELDS}
  abstract_state = program.abstract_state()
  # Lowering needs the TPU mesh in context (some Mosaic rules read the device kind from it);
  # only lowering: optax's eager init above would otherwise run on compile-only devices.
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = program.step.lower(abstract_state, batch).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  tokens_per_device = shape[0] * shape[1] / len(devices)
  report = CompileReport(
      topology=config.topology.name, device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
      compile_seconds=seconds, argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes,
      custom_calls=compiled.as_text().count("tpu_custom_call"),
      flops_per_step_per_device=tokens_per_device * flops.training_flops_per_token(
          config.model, config.data.seq_len))
  return report, compiled
