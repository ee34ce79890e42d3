"""The tree keeps the shape docs/design.md draws: checked on the source, so a change that
breaks it fails here instead of drifting.

- every adapter has the same files for the same roles, each module named after its
  direction (``capture*`` framework -> IR, ``emit*`` IR -> framework, ``backend*`` the
  backend protocol, ``host`` / ``nesting`` the host side);
- no import cycles between the modules of an adapter (lazy imports inside functions
  count too), and no private ``_name`` imported from another file anywhere;
- modules stay under 600 lines;
- the core looks hosts and adapters up: the emit fronts, ``convert`` and the CLI never
  branch on a framework's name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ["torch", "keras", "flax"]
ROLE_FILES = {
    "__init__.py",
    "backend.py",
    "capture.py",
    "emitter.py",
    "emit_layers.py",
    "emit_recurrent.py",
    "host.py",
    "nesting.py",
}
PREFIXES = ("capture", "emit", "backend")
MAX_LINES = 600


def _packages() -> list[Path]:
    packages = [ROOT / "adapters" / name for name in ADAPTERS]
    return packages + [ROOT / "interop", ROOT / "interop" / "ops"]


def _relative_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module imported from, name, line) of every ``from .x import name`` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                module = node.module or alias.name  # `from . import x` imports module x
                found.append((module.split(".")[0], alias.name, node.lineno))
    return found


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_share_file_names_by_role(name):
    files = {p.name for p in (ROOT / "adapters" / name).glob("*.py")}
    assert ROLE_FILES <= files, sorted(ROLE_FILES - files)
    for file in files - ROLE_FILES:
        assert file.startswith(PREFIXES), f"adapters/{name}/{file} is named for no direction"


@pytest.mark.parametrize("package", _packages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_import_cycles_and_no_private_imports(package):
    modules = {p.stem: p for p in package.glob("*.py")}
    edges: dict[str, set[str]] = {}
    private = []
    for name, path in modules.items():
        edges[name] = set()
        for module, imported, line in _relative_imports(path):
            if module in modules and module not in (name, "__init__"):
                edges[name].add(module)  # the package's __init__ holds the registries
            if imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{path.name}:{line} imports {imported} from .{module}")
    assert not private
    if package.parent.name != "adapters":
        return  # the core's facade (graph.py) imports its parts lazily, and they its types
    cycles = []
    for start in edges:  # a path back to `start` through the import graph is a cycle
        seen, todo = set(), list(edges[start])
        while todo:
            current = todo.pop()
            if current == start:
                cycles.append(start)
                break
            if current not in seen:
                seen.add(current)
                todo.extend(edges.get(current, ()))
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_modules_stay_small():
    long = {}
    for folder in ("interop", "adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            count = len(path.read_text().splitlines())
            if count > MAX_LINES:
                long[path.relative_to(ROOT).as_posix()] = count
    assert not long


@pytest.mark.parametrize("module", ["emit.py", "conversion.py", "cli.py", "tracing.py"])
def test_core_fronts_do_not_branch_on_framework_names(module):
    """No comparison with a framework's name: hosts and adapters are looked up by name."""
    tree = ast.parse((ROOT / "interop" / module).read_text())
    names = ("torch", "keras", "flax", "jax")
    branches = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(
            isinstance(side, ast.Constant) and side.value in names
            for side in [node.left, *node.comparators]
        )
    ]
    assert not branches
