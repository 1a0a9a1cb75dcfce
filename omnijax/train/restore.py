"""A training run read back from its workdir: its config, and its model restored onto any mesh
(what generate, eval and the main job's evaluation start from)."""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from omnijax.config import Config, ConfigError, from_dict, load_yaml
from omnijax.files import resolve
from omnijax.sharding import make_mesh
from omnijax.train.checkpoints import Checkpoints, CheckpointMismatchError, CheckpointRestoreError
from omnijax.train.state import StateLayout
from omnijax.train.workdir import CHECKPOINTS_DIR, CONFIG_FILE

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
