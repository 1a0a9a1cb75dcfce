"""`omnijax scaling`: how a config's train step fits and scales over one TPU generation's slices.

For every shipped topology of the generation (tpu_configs/topology/<generation>-*.yaml) with a
chip count in `--chips`, and every sharding strategy in `--strategies`, the train step is
compiled ahead of time (omnijax.podfit.aot) at the same global batch, with gradient accumulation
chosen so that each micro-batch puts `--rows-per-chip` rows on every batch shard. The sweep
writes scaling.csv, scaling.json (with the smallest slice that fits per strategy) and
scaling.png (per-chip peak memory and predicted step time against chips).

Strategies (the mesh of each point):
  fsdp         all chips on the FSDP axis
  fsdp_tensor  FSDP x `--tensor` tensor parallelism
  data_fsdp    `--data` data-parallel replicas x FSDP within each
  multislice   two slices of half the chips each, data parallel over the data-center network
               between them (mesh.dcn_data = 2), FSDP within each slice
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
import re
import sys

from omnijax.config import (CONFIG_ROOT, Config, ConfigError, apply_overrides, from_dict,
                            load_yaml_tree)

STRATEGIES = ("fsdp", "fsdp_tensor", "data_fsdp", "multislice")
# Slices of a multislice point.
SLICES = 2
GENERATIONS = ("v4", "v5e", "v5p", "v6e")
COLUMNS = ("generation", "topology", "chips", "strategy", "mesh", "grad_accum_steps", "fits",
           "peak_bytes_per_chip", "hbm_bytes_per_chip", "analytic_min_bytes_per_chip",
           "ratio_to_analytic_min", "tflops_per_chip_per_step", "predicted_step_seconds",
           "compile_seconds", "note")


def shipped_topologies(generation: str) -> dict[int, pathlib.Path]:
  """Chip count -> topology YAML, for one generation's shipped single slices."""
  if generation not in GENERATIONS:
    raise ConfigError(f"--generation {generation!r}: expected one of {', '.join(GENERATIONS)}")
  found = {}
  for path in sorted((CONFIG_ROOT / "topology").glob(f"{generation}-*.yaml")):
    topology = load_yaml_tree(path)["topology"]
    if topology.get("num_slices", 1) > 1:
      continue
    dims = re.fullmatch(r"[a-z0-9]+:([0-9x]+)", topology["name"]).group(1)
    found[math.prod(int(d) for d in dims.split("x"))] = path
  return found


def strategy_mesh(strategy: str, tensor: int, data: int) -> dict[str, int]:
  if strategy == "fsdp":
    return {"data": 1, "fsdp": -1, "tensor": 1}
  if strategy == "fsdp_tensor":
    return {"data": 1, "fsdp": -1, "tensor": tensor}
  if strategy == "data_fsdp":
    return {"data": data, "fsdp": -1, "tensor": 1}
  if strategy == "multislice":
    return {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": SLICES}
  raise ConfigError(f"--strategies: unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


def point_config(tree: dict, topology_file: pathlib.Path, chips: int, mesh: dict[str, int],
                 rows_per_chip: int) -> Config | str:
  """The config of one sweep point, or why the point cannot run at this global batch.

  `topology_file` is one slice; a mesh with `dcn_data` takes that many of them.
  """
  slices = mesh.get("dcn_data", 1)
  topology = dict(load_yaml_tree(topology_file)["topology"], num_slices=slices)
  tree = dict(tree, topology=topology, mesh=mesh)
  global_batch = tree.get("data", {}).get("global_batch_size", Config().data.global_batch_size)
  known = math.prod(size for size in mesh.values() if size != -1)  # dcn_data included
  if chips % known:
    return f"{chips} chips do not split into mesh {mesh}"
  batch_shards = chips // mesh["tensor"]
  micro_batch = batch_shards * rows_per_chip
  if global_batch % micro_batch:
    return (f"global batch {global_batch} does not split into micro-batches of {micro_batch} rows "
            f"({rows_per_chip} per batch shard)")
  tree["train"] = dict(tree.get("train", {}), grad_accum_steps=global_batch // micro_batch)
  return from_dict(Config, tree)


def smallest_fits(rows: list[dict]) -> dict[str, dict]:
  """Strategy -> the row of the fewest chips that fit."""
  best = {}
  for row in rows:
    if row["fits"] and (row["strategy"] not in best or row["chips"] < best[row["strategy"]]["chips"]):
      best[row["strategy"]] = row
  return best


def sweep(config_path: str, overrides: list[str], generation: str, chips: list[int],
          strategies: list[str], stage: str | None, tensor: int, data: int,
          rows_per_chip: int) -> list[dict]:
  from tqdm import tqdm

  from omnijax.podfit.aot import compile_train_step

  tree = apply_overrides(load_yaml_tree(config_path), overrides)
  topologies = shipped_topologies(generation)
  meshes = {strategy: strategy_mesh(strategy, tensor, data) for strategy in strategies}
  # A point's slice: all its chips, or 1 / dcn_data of them on several slices.
  points = [(count, strategy) for count in sorted(chips) for strategy in strategies]
  slice_chips = {(count, strategy): count // meshes[strategy].get("dcn_data", 1)
                 for count, strategy in points}
  # A chip count no strategy can run is a mistake in --chips; a strategy that cannot run at a
  # count the others can (multislice at the smallest slices) is a row of the table.
  for count in sorted(chips):
    if not any(slice_chips[count, strategy] in topologies for strategy in strategies):
      strategy = strategies[0]
      raise ConfigError(f"--chips {count}: no shipped {generation} slice of "
                        f"{slice_chips[count, strategy]} chips for strategy {strategy} "
                        f"(shipped: {sorted(topologies)})")
  rows = []
  progress = tqdm(points, desc=f"scaling {generation}", unit="compile", file=sys.stderr)
  for count, strategy in progress:
    progress.set_postfix_str(f"{count} chips, {strategy}")
    if slice_chips[count, strategy] not in topologies:
      rows.append({"generation": generation, "chips": count, "strategy": strategy,
                   "topology": "-", "fits": False,
                   "note": f"no shipped {generation} slice of {slice_chips[count, strategy]} chips"})
      continue
    topology_file = topologies[slice_chips[count, strategy]]
    slices = meshes[strategy].get("dcn_data", 1)
    row = {"generation": generation, "chips": count, "strategy": strategy,
           "topology": topology_file.stem + (f"x{slices}" if slices > 1 else "")}
    try:
      config = point_config(tree, topology_file, count, meshes[strategy], rows_per_chip)
    except ConfigError as e:
      raise ConfigError(f"{config_path}: {e}") from None
    if isinstance(config, str):
      rows.append(dict(row, fits=False, note=config))
      continue
    report, _ = compile_train_step(config, stage)
    # The row's topology stays the slice's name (v5e-8), not libtpu's (v5e:2x4).
    compiled = {key: value for key, value in report.to_json().items() if key in COLUMNS}
    rows.append(dict(compiled, **row, grad_accum_steps=config.train.grad_accum_steps,
                     note=report.error or ""))
  return rows


def to_csv(rows: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({key: json.dumps(row[key]) if isinstance(row.get(key), dict) else row.get(key)
                     for key in COLUMNS})
  return out.getvalue()


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from omnijax.files import atomic_write

  gib = 2 ** 30
  best = smallest_fits(rows)
  figure, (memory_axes, time_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
  for strategy in dict.fromkeys(row["strategy"] for row in rows):
    compiled = [row for row in rows if row["strategy"] == strategy and row.get("peak_bytes_per_chip")]
    if not compiled:
      continue
    chips = [row["chips"] for row in compiled]
    line, = memory_axes.plot(chips, [row["peak_bytes_per_chip"] / gib for row in compiled],
                             marker="o", label=strategy)
    # Hollow markers: does not fit.
    memory_axes.scatter([row["chips"] for row in compiled if not row["fits"]],
                        [row["peak_bytes_per_chip"] / gib for row in compiled if not row["fits"]],
                        s=80, facecolors="white", edgecolors=line.get_color(), zorder=3)
    timed = [row for row in compiled if row.get("predicted_step_seconds")]
    time_axes.plot([row["chips"] for row in timed],
                   [row["predicted_step_seconds"] for row in timed], marker="o",
                   color=line.get_color(), label=strategy)
    if strategy in best:
      memory_axes.scatter([best[strategy]["chips"]], [best[strategy]["peak_bytes_per_chip"] / gib],
                          marker="*", s=260, color=line.get_color(), zorder=4)
  hbm = {row["hbm_bytes_per_chip"] for row in rows if row.get("hbm_bytes_per_chip")}
  for capacity in hbm:
    memory_axes.axhline(capacity / gib, color="black", linestyle="--", linewidth=1,
                        label=f"HBM {capacity / gib:.0f} GiB")
  for axes, label in ((memory_axes, "peak memory per chip (GiB)"),
                      (time_axes, "predicted step time (s, analytic FLOPs / peak)")):
    axes.set_xscale("log", base=2)
    axes.set_xlabel("chips")
    axes.set_ylabel(label)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
  memory_axes.set_title("star: smallest slice that fits; hollow: does not fit", fontsize=9)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
  plt.close(figure)


def write_outputs(rows: list[dict], out: pathlib.Path, title: str) -> None:
  from omnijax.files import atomic_write_text

  out.mkdir(parents=True, exist_ok=True)
  best = smallest_fits(rows)
  atomic_write_text(out / "scaling.csv", to_csv(rows))
  atomic_write_text(out / "scaling.json", json.dumps(
      {"title": title, "points": rows,
       "smallest_fit": {strategy: {"topology": row["topology"], "chips": row["chips"]}
                        for strategy, row in best.items()}}, indent=2) + "\n")
  plot(rows, out / "scaling.png", title)
