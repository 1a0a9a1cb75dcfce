"""Golden shardings: every shipped experiment's parameter layout, checked in and diffed.

For each experiment under tpu_configs/experiments/ that names a TPU topology, the golden JSON
records the mesh and, per parameter path, its global shape, PartitionSpec and per-chip shape, as
the rules table (omnijax.sharding.RULES) lays them out on that topology's devices. A change to
the rules, the model or a config that moves a parameter shows up as a failing test
(tests/podfit/test_golden_shardings.py) until the goldens are regenerated on purpose with
`omnijax shardings --update` and the diff is reviewed. Experiments without a topology run on
whatever local devices there are, so they have no golden.
"""

from __future__ import annotations

import json
import pathlib
import sys

from omnijax.config import CONFIG_ROOT, Config, load_config

EXPERIMENTS_DIR = CONFIG_ROOT / "experiments"
GOLDEN_DIR = CONFIG_ROOT.parent / "tests" / "golden" / "shardings"


def shipped_experiments() -> dict[str, Config]:
  """Experiment name -> config, for the experiments that name a TPU topology."""
  configs = {path.stem: load_config(path) for path in sorted(EXPERIMENTS_DIR.glob("*.yaml"))}
  return {name: config for name, config in configs.items() if config.topology.name}


def _spec_json(spec) -> list:
  return [list(entry) if isinstance(entry, tuple) else entry for entry in spec]


def sharding_record(config: Config) -> dict:
  """{"topology", "num_slices", "mesh", "params": {path: {"shape", "spec", "per_chip_shape"}}}."""
  import jax
  from flax import nnx

  from omnijax.model.build import abstract_model
  from omnijax.podfit.aot import topology_devices
  from omnijax.sharding import make_mesh, path_str, state_shardings

  mesh = make_mesh(config.mesh, topology_devices(config))
  _, abstract_state = abstract_model(config.model)
  shardings = state_shardings(abstract_state, mesh)
  params = {}
  is_variable = lambda x: isinstance(x, nnx.Variable)
  for (path, variable), sharding in zip(
      jax.tree_util.tree_leaves_with_path(abstract_state, is_leaf=is_variable),
      jax.tree.leaves(shardings)):
    shape = tuple(variable.get_value().shape)
    params[path_str(path)] = {"shape": list(shape), "spec": _spec_json(sharding.spec),
                              "per_chip_shape": list(sharding.shard_shape(shape))}
  return {"topology": config.topology.name, "num_slices": config.topology.num_slices,
          "mesh": dict(mesh.shape), "params": params}


def differences(expected: dict, actual: dict, limit: int = 5) -> list[str]:
  """Human-readable differences between two records (at most `limit`)."""
  found = []
  for key in ("topology", "num_slices", "mesh"):
    if expected.get(key) != actual.get(key):
      found.append(f"{key}: golden {expected.get(key)}, now {actual.get(key)}")
  old, new = expected.get("params", {}), actual.get("params", {})
  for path in sorted(set(old) | set(new)):
    if path not in new:
      found.append(f"{path}: in the golden, no longer a parameter")
    elif path not in old:
      found.append(f"{path}: new parameter {new[path]}")
    elif old[path] != new[path]:
      changed = [f"{field} {old[path][field]} -> {new[path][field]}" for field in new[path]
                 if old[path].get(field) != new[path][field]]
      found.append(f"{path}: {', '.join(changed)}")
  return found[:limit]


def to_json(record: dict) -> str:
  """One line per parameter, so that a golden's git diff names exactly what moved."""
  lines = [f'{{"topology": {json.dumps(record["topology"])}, '
           f'"num_slices": {record["num_slices"]}, '
           f'"mesh": {json.dumps(record["mesh"])}, "params": {{']
  rows = [f"  {json.dumps(path)}: {json.dumps(entry)}"
          for path, entry in sorted(record["params"].items())]
  return "\n".join(lines + [",\n".join(rows), "}}"]) + "\n"


def golden_path(name: str, directory: pathlib.Path = GOLDEN_DIR) -> pathlib.Path:
  return pathlib.Path(directory) / f"{name}.json"


def check_or_update(names: list[str] | None, directory: pathlib.Path, update: bool) -> int:
  from omnijax.files import atomic_write_text

  experiments = shipped_experiments()
  unknown = sorted(set(names or ()) - set(experiments))
  if unknown:
    print(f"omnijax shardings: {unknown[0]} is not a shipped experiment with a TPU topology "
          f"(known: {', '.join(experiments)})", file=sys.stderr)
    return 2
  failed = 0
  for name in names or list(experiments):
    record = sharding_record(experiments[name])
    path = golden_path(name, directory)
    if update:
      path.parent.mkdir(parents=True, exist_ok=True)
      atomic_write_text(path, to_json(record))
      print(f"wrote {path}")
      continue
    if not path.is_file():
      print(f"{name}: no golden at {path}; run `omnijax shardings --update {name}`")
      failed += 1
      continue
    found = differences(json.loads(path.read_text()), record)
    if found:
      failed += 1
      print(f"{name}: shardings differ from {path}:\n  " + "\n  ".join(found))
    else:
      print(f"{name}: matches {path.name}")
  if failed:
    print(f"{failed} experiment(s) differ; if the change is intended, run "
          "`omnijax shardings --update` and review the diff", file=sys.stderr)
  return 1 if failed else 0
