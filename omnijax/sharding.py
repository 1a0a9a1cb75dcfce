"""Device mesh, the one logical-axis rules table, and the checks on how parameters are sharded.

Every parameter carries `logical_axes` metadata (one name per dimension) and every major
activation is constrained by logical names; `RULES` alone maps those names to mesh axes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from omnijax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters are FSDP-sharded on their model dimension and
# tensor-sharded on heads / MLP / vocabulary; activations are batch-sharded over data and fsdp.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    # the speech encoder's other dimensions (its width, heads and FFN use the names above):
    # stacked fbank frames (560 wide: the input block's q/k/v and the query table, a quarter of
    # a small encoder's parameters, so FSDP-sharded like `embed`; on an fsdp axis that does not
    # divide 560, e.g. 32, they stay whole, see logical_to_spec), the query table's rows and the
    # FSMN filter taps (both small)
    ("speech_features", "fsdp"),
    ("speech_queries", None),
    ("fsmn_taps", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
_RULES = dict(RULES)


def _fill(sizes: dict[str, int], available: int, what: str, prefix: str) -> tuple[int, ...]:
  """Mesh axis sizes with the one -1 filled so that they multiply to `available`."""
  sizes = dict(sizes)
  known = math.prod(size for size in sizes.values() if size != -1)
  for axis, size in sizes.items():
    if size == -1:
      if available % known:
        raise ConfigError(f"mesh.{prefix}{axis}=-1: {available} {what} are not divisible by the "
                          f"other axes' product {known} ({sizes})")
      sizes[axis] = available // known
  if math.prod(sizes.values()) != available:
    raise ConfigError(f"mesh {prefix}{sizes} needs {math.prod(sizes.values())} {what} but "
                      f"{available} are available; set one mesh.{prefix}* axis to -1 or fix "
                      "the sizes")
  return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the (data, fsdp, tensor) mesh. On several slices (the devices' `slice_index`), each
  axis is split into an across-slices (DCN) part and a within-slice (ICI) part, so the rules
  table needs no slice-specific names: `data` spans the slices when mesh.dcn_data > 1."""
  devices = list(jax.devices() if devices is None else devices)
  slices = len({getattr(device, "slice_index", 0) for device in devices})
  ici = _fill(config.as_dict(), len(devices) // slices,
              "devices per slice" if slices > 1 else "devices", "")
  dcn = _fill(config.dcn_dict(), slices, "slices", "dcn_")
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
  from jax.experimental import mesh_utils

  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None], mesh=None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Logical axis names -> PartitionSpec via `RULES`; mesh axes of size 1 are dropped.

  Given the array's `shape` (parameters), a mesh axis that does not divide its dimension (jit
  refuses uneven input shards) moves to the largest other dimension it divides, so that e.g. the
  encoder's 560-wide input kernels still shard on an fsdp axis of 32 or 64; with none, it stays
  off the array.
  """
  spec: list[tuple[str, ...]] = []
  used: set[str] = set()
  homeless: list[str] = []
  for index, name in enumerate(names):
    if name is not None and name not in _RULES:
      raise KeyError(f"logical axis {name!r} has no entry in omnijax.sharding.RULES")
    target = _RULES.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    # A mesh axis may shard only one dimension of an array.
    axes = tuple(a for a in axes if a not in used)
    if shape is not None and mesh is not None:
      fitting = _dividing(axes, shape[index], mesh, ())
      homeless += axes[len(fitting):]
      axes = fitting
    used.update(axes)
    spec.append(axes)
  for axis in homeless:
    if axis in used:
      continue
    for index in sorted(range(len(spec)), key=lambda i: -shape[i]):
      if _dividing((axis,), shape[index], mesh, spec[index]):
        spec[index] += (axis,)
        used.add(axis)
        break
  return PartitionSpec(*(axes[0] if len(axes) == 1 else (axes or None) for axes in spec))


def _dividing(axes: tuple[str, ...], size: int, mesh, already: tuple[str, ...]) -> tuple[str, ...]:
  """The leading `axes` that still split `size` evenly after the mesh axes `already` on it."""
  kept, pieces = [], math.prod(mesh.shape[axis] for axis in already)
  for axis in axes:
    if size % (pieces * mesh.shape[axis]):
      break
    kept.append(axis)
    pieces *= mesh.shape[axis]
  return tuple(kept)


def shard_count(name: str, mesh) -> int:
  """Into how many pieces the logical axis `name` is split on `mesh`."""
  entry = logical_to_spec((name,), mesh)[0]
  axes = (entry,) if isinstance(entry, str) else (entry or ())
  return math.prod(mesh.shape[axis] for axis in axes)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op when no mesh is set (single-device use)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh))


def _logical_axes(variable: nnx.Variable) -> tuple:
  names = variable.get_metadata().get("logical_axes")
  if names is None or len(names) != variable.get_value().ndim:
    raise ValueError(f"parameter of shape {variable.get_value().shape} has logical_axes {names}; "
                     "every parameter needs one logical name per dimension")
  return tuple(names)


def parameter_spec(variable: nnx.Variable, mesh) -> PartitionSpec:
  """Where a parameter lives on `mesh`: its logical axes through `RULES`, for its shape."""
  return logical_to_spec(_logical_axes(variable), mesh, variable.get_value().shape)


def state_shardings(state, mesh) -> object:
  """nnx.State of Variables -> matching tree of NamedShardings on `mesh`."""
  return jax.tree.map(lambda v: NamedSharding(mesh, parameter_spec(v, mesh)),
                      state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_fraction(state, mesh) -> float:
  """Fraction of parameter bytes that are stored whole on every device."""
  total = replicated = 0
  for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    value = variable.get_value()
    size = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
    total += size
    if all(axis is None for axis in parameter_spec(variable, mesh)):
      replicated += size
  return replicated / max(total, 1)


def assert_sufficiently_sharded(state, mesh, tolerance: float = 0.02) -> None:
  """Fails when more than `tolerance` of parameter bytes are replicated on an FSDP mesh."""
  if mesh.shape.get("fsdp", 1) <= 1:
    return
  fraction = replicated_fraction(state, mesh)
  if fraction > tolerance:
    raise AssertionError(f"{fraction:.1%} of parameter bytes are replicated on mesh "
                         f"{dict(mesh.shape)} (tolerance {tolerance:.0%}); check sharding.RULES")


def path_str(path) -> str:
  """A jax tree path (dict keys, sequence indices) -> 'layers/self_attn/q_proj/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def sharding_table(state, mesh) -> list[tuple[str, tuple, tuple, PartitionSpec]]:
  """(path, shape, logical axes, mesh spec) for every parameter, for `omnijax info`."""
  rows = []
  for path, variable in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    name = path_str(path)
    rows.append((name, tuple(variable.get_value().shape), _logical_axes(variable),
                 parameter_spec(variable, mesh)))
  return rows
