"""The runtime layer every entry point uses (`omnijax train`, `compile`, generate/eval, the
benchmarks and the tests), so none of them re-assembles the pipeline:

  * `initialize()`: the libtpu/XLA environment (set once, here) and `jax.distributed` when the
    job spans several processes (a multi-host TPU VM slice, or an explicit coordinator);
  * `is_primary`, `barrier`, `gather`, `any_process`: the few cross-process agreements;
  * `build_train_program()`: mesh -> state layout -> optimizer -> jitted, sharded train step;
  * `restore_workdir()`: a training run's model, restored onto any mesh.

Layering: above the train building blocks (step, state, optimizer, checkpoints), below the
programs that drive them (train/loop.py, eval, generate, aot).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx

from omnijax.config import Config, ConfigError, from_dict, load_yaml
from omnijax.files import resolve
from omnijax.sharding import make_mesh
from omnijax.train.checkpoints import Checkpoints, CheckpointMismatchError, CheckpointRestoreError
from omnijax.train.optimizer import global_schedule
from omnijax.train.state import StateLayout
from omnijax.train.step import (TrainState, batch_sharding, check_batch_fits_mesh, jit_train_step,
                                make_train_step)
from omnijax.train.workdir import CHECKPOINTS_DIR, CONFIG_FILE

# The environment variables `initialize()` reads when the options are not given (JAX itself
# reads the first).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# How long a process waits for the others at start-up, and how soon the survivors notice that
# a process died (they then exit with an error instead of waiting in a collective forever).
INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 60


###################### Process setup ######################


def on_tpu_vm() -> bool:
  """TPU VMs expose their chips as /dev/accel* (v4, v5p) or vfio devices (v5e, v6e)."""
  return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def configure_environment(host_devices: int | None = None) -> None:
  """The libtpu and XLA environment; must run before the first JAX backend use."""
  if not on_tpu_vm():
    # libtpu (installed for AOT compilation) probes GCE metadata when loaded and warns loudly
    # on machines that are not TPU VMs.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu's lock file guards chips against a second process; without chips there is none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Off a TPU VM libtpu cannot find the host's accelerator type and says so on every load;
    # compile-only use describes its topology explicitly (topology.*), so any valid type does.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  if host_devices:
    flag = f"--xla_force_host_platform_device_count={host_devices}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process sits in the job: coordinator None means a single-process job, unless
  the job runs on a TPU VM slice, whose workers JAX discovers from the TPU metadata."""

  coordinator: str | None = None
  num_processes: int = 1
  process_id: int = 0

  @classmethod
  def resolve(cls, coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> ProcessGroup:
    """Explicit options first, then the environment variables; checks they fit together."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
      num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
      process_id = _env_int(ENV_PROCESS_ID)
    if coordinator is None:
      if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ConfigError("--num-processes/--process-id need --coordinator HOST:PORT "
                          f"(or {ENV_COORDINATOR})")
      return cls()
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"--coordinator={coordinator!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    if num_processes is None or process_id is None:
      raise ConfigError(f"--coordinator {coordinator} needs --num-processes N and --process-id I "
                        f"(or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--process-id={process_id} must lie in [0, --num-processes="
                        f"{num_processes})")
    return cls(coordinator, num_processes, process_id)


def _env_int(name: str) -> int:
  try:
    return int(os.environ[name])
  except ValueError:
    raise ConfigError(f"environment variable {name}={os.environ[name]!r}: expected an integer") \
        from None


def initialize(*, host_devices: int | None = None, coordinator: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               distributed: bool = True) -> ProcessGroup:
  """Sets up this process; call once, before anything touches a JAX backend.

  `distributed=False` is for work that runs on this host alone (AOT compilation, config and
  data commands): no `jax.distributed` on a TPU VM, and libtpu may load beside a training job.
  """
  configure_environment(host_devices)
  group = ProcessGroup.resolve(coordinator, num_processes, process_id)
  if not distributed:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if group.coordinator is None:
      return group
  if jax.distributed.is_initialized():
    return group
  if group.coordinator is not None:
    if not on_tpu_vm():
      # CPU processes exchange collectives through gloo (the default has none across processes).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                               initialization_timeout=INITIALIZATION_TIMEOUT_S,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
  elif on_tpu_vm():
    # Every worker of a slice runs this same program; JAX finds the coordinator, the process
    # count and this worker's index in the TPU metadata (one worker: a one-process job).
    jax.distributed.initialize(initialization_timeout=INITIALIZATION_TIMEOUT_S,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
  return group


###################### Cross-process agreement (no-ops in a single process) ######################


def is_primary() -> bool:
  """Process 0 writes shared files (metrics, configs, plots, generated data)."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process when it is True on any (e.g. one host got SIGTERM)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def gather(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  encoded = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(encoded)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:len(encoded)] = encoded
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:length])) for row, length in zip(rows, lengths)]


class ProcessFailed(RuntimeError):
  """Another process failed in work the others were waiting for."""


def primary_first(work: Callable[[], object]) -> None:
  """Runs `work` on process 0 while the others wait for it. If it raises, every process raises:
  process 0 its own exception, the others the same one-line message (a ConfigError stays a
  ConfigError), so no host waits for a primary that is gone."""
  error = None
  if is_primary():
    try:
      work()
    except Exception as e:  # noqa: BLE001 -- every failure must reach the other hosts
      error = e
  if jax.process_count() > 1:
    message = None if error is None else [isinstance(error, ConfigError), str(error)]
    first = gather(message)[0]  # also the barrier
    if error is None and first is not None:
      is_config_error, text = first
      raise (ConfigError if is_config_error else ProcessFailed)(f"process 0 failed: {text}")
  if error is not None:
    raise error


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


###################### The training program ######################


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """One stage's jitted, sharded train step and the layout of the state it updates."""

  mesh: jax.sharding.Mesh
  layout: StateLayout
  stage: str
  tx: optax.GradientTransformation
  shardings: TrainState
  # (state, batch) -> (state, metrics); the state is donated (updated in place).
  step: Callable

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return batch_sharding(self.mesh)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: a restore target, or the AOT compiler's input."""
    return self.layout.abstract_state(self.tx)

  def init_state(self, params, step) -> TrainState:
    """State from parameters (already on the mesh) with a fresh optimizer state."""
    init_opt = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)
    return TrainState(params, init_opt(params), jax.device_put(step, self.layout.replicated))


def build_train_program(config: Config, stage: str | None = None, *,
                        mesh: jax.sharding.Mesh | None = None,
                        layout: StateLayout | None = None) -> TrainProgram:
  """The train step of `stage` (default: the first) on `mesh` (default: `config.mesh` over all
  devices). Pass `layout` to reuse one already built for this mesh (it is stage-independent)."""
  mesh = make_mesh(config.mesh) if mesh is None else mesh
  check_batch_fits_mesh(config, mesh)
  stages = config.train.ordered_stages
  if not stages:
    raise ConfigError("train.stages is empty: configure at least one stage")
  stage_name = config.train.resolve_stage(stage) if stage else stages[0][0]
  layout = StateLayout.create(config, mesh) if layout is None else layout
  tx = layout.optimizer(config, config.train.stages[stage_name])
  shardings = layout.shardings(tx)
  step = jit_train_step(make_train_step(config, layout.graphdef, tx, global_schedule(config.train),
                                        layout.trainable(config.train.stages[stage_name])),
                        shardings, mesh)
  return TrainProgram(mesh, layout, stage_name, tx, shardings, step)


###################### A trained model, restored onto any mesh ######################


class WorkdirError(ConfigError):
  """The workdir holds no run that can be restored; the message says what is missing."""


@dataclasses.dataclass
class RestoredRun:
  config: Config  # the run's config (workdir/config.yaml)
  model: nnx.Module  # the Transformer with the checkpoint's parameters, sharded on the mesh
  step: int
  stage: str


def read_run_config(workdir: str | os.PathLike) -> Config:
  """The config a training run wrote into its workdir."""
  path = resolve(workdir) / CONFIG_FILE
  try:
    if path.exists() and not path.is_file():  # e.g. a link to /dev/zero, which never ends
      raise WorkdirError(f"{path}: not a regular file; is {workdir} a training workdir?")
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path}: cannot read the run's config ({getattr(e, 'strerror', '') or e});"
                       f" is {workdir} a training workdir?") from None
  tree = load_yaml(text, str(path))  # its errors name the file
  try:
    return from_dict(Config, tree)
  except ConfigError as e:
    raise WorkdirError(f"{path}: {e}") from None


def restore_workdir(workdir: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    step: int | None = None) -> RestoredRun:
  """The run in `workdir` at `step` (default: its newest readable checkpoint), its parameters
  sharded on `mesh` (default: the run config's mesh section over all local devices)."""
  config = read_run_config(workdir)
  if mesh is None:
    mesh = make_mesh(config.mesh, jax.local_devices())
  layout = StateLayout.create(config, mesh)
  params = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=sharding),
                        layout.abstract_params, layout.param_shardings)

  directory = resolve(workdir) / CHECKPOINTS_DIR
  if not directory.is_dir():
    raise WorkdirError(f"{workdir}: no checkpoints directory ({directory}); has training saved "
                       "a checkpoint yet?")
  checkpoints = Checkpoints(directory, keep=None, read_only=True)
  try:
    # The parameters are the same for every stage (only the optimizer state differs).
    restored = (checkpoints.restore_latest(lambda meta: params, params_only=True)
                if step is None else checkpoints.restore(step, lambda meta: params,
                                                         params_only=True))
  except CheckpointMismatchError as e:
    raise WorkdirError(f"{resolve(workdir) / CONFIG_FILE} does not describe the run's "
                       f"checkpoints ({e}); was it edited after training? Restore it") from None
  except CheckpointRestoreError as e:
    raise WorkdirError(str(e)) from None
  finally:
    checkpoints.close()
  if restored is None:
    raise WorkdirError(f"{workdir}: no checkpoint under {checkpoints.directory}")
  restored_step, state, _, meta = restored
  model = nnx.merge(layout.graphdef, state["params"])
  return RestoredRun(config=config, model=model, step=restored_step, stage=meta["stage"])
