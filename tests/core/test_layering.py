"""The package's layering (docs/architecture.md) holds for every import in omnijax/."""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
ARCHITECTURE = REPO / "docs" / "architecture.md"
# A row of the floors table: | 3 | `omnijax/data/` | what it owns |
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([^`]+)`\s*\|")


def read_floors(text: str) -> dict[str, int]:
  """Room (a module path like omnijax/config.py or a folder like omnijax/data/) -> floor."""
  floors = {}
  for line in text.splitlines():
    match = ROW.match(line)
    if match:
      floors[match.group(2)] = int(match.group(1))
  return floors


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, module: str, modules: set[str]) -> set[str]:
  """Every omnijax module `path` imports, at module level or inside functions."""
  found = set()
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from omnijax.x import y` imports the module x.y where there is one, else a name of x.
      for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found.add(submodule if submodule in modules else base)
  return {name for name in found if name in modules and name != module}


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """Module -> the omnijax modules it imports."""
  files = {module_name(path, root): path for path in root.rglob("*.py")}
  return {module: imports_of(path, module, set(files)) for module, path in files.items()}


def room_of(module: str, floors: dict[str, int]) -> str | None:
  path = module.replace(".", "/")
  for room in floors:
    if room.endswith("/") and (path + "/").startswith(room):
      return room
    if room == path + ".py":
      return room
  return None


def violations(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
  found = []
  for module, imported in sorted(graph.items()):
    room = room_of(module, floors)
    if room is None:
      if module != "omnijax":  # the package's own __init__ imports nothing
        found.append(f"{module} is in no room of docs/architecture.md")
      continue
    for target in sorted(imported):
      target_room = room_of(target, floors)
      if target_room is None or target_room == room:
        continue
      if floors[target_room] >= floors[room]:
        found.append(f"{module} (floor {floors[room]}) imports {target} "
                     f"(floor {floors[target_room]})")
  return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every import circle between modules (Tarjan's strongly connected components)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in graph.get(node, ()):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


@pytest.fixture(scope="module")
def floors():
  return read_floors(ARCHITECTURE.read_text())


def test_every_import_points_down_and_there_are_no_circles(floors):
  graph = import_graph(REPO / "omnijax")
  assert len(floors) >= 10, "the floors table of docs/architecture.md was not found"
  assert violations(graph, floors) == []
  assert circles(graph) == []


def test_every_room_of_the_table_exists(floors):
  for room in floors:
    assert (REPO / room).exists(), f"docs/architecture.md names {room}, which does not exist"


def test_the_walk_catches_an_import_back_up_a_circle_and_a_homeless_module(floors, tmp_path):
  # A copy of the package with three faults planted: the check must see each of them.
  root = tmp_path / "omnijax"
  for path in (REPO / "omnijax").rglob("*.py"):
    target = root / path.relative_to(REPO / "omnijax")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(path.read_text())
  with open(root / "model" / "rope.py", "a") as f:
    f.write("\n\ndef _late():\n  from omnijax.train import loop  # noqa: F401\n")
  with open(root / "data" / "tasks.py", "a") as f:
    f.write("\nfrom omnijax.processes import is_primary  # noqa: F401,E402\n")
  with open(root / "files.py", "a") as f:
    f.write("\nfrom . import vocab  # noqa: F401,E402\n")
  with open(root / "vocab.py", "a") as f:
    f.write("\nimport omnijax.files  # noqa: F401,E402\n")
  (root / "stray.py").write_text("import omnijax.config\n")
  found = violations(import_graph(root), floors)
  assert "omnijax.model.rope (floor 6) imports omnijax.train.loop (floor 8)" in found
  assert "omnijax.data.tasks (floor 4) imports omnijax.processes (floor 4)" in found
  assert "omnijax.stray is in no room of docs/architecture.md" in found
  assert ["omnijax.files", "omnijax.vocab"] in circles(import_graph(root))
