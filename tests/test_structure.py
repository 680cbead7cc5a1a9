"""The package's shape: no import cycle, shared layers that import no method, modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ddad"

# Modules allowed past ~300 lines, and why.
LONG_MODULES = {
    "ddad.diffusion.unet": "the authors' UNet, one network whose state_dict layout must match theirs",
    "ddad.data.formats": "seven small readers, one per dataset layout, and the index over categories",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``name`` imports: at module level, in functions, under TYPE_CHECKING."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name and not name.startswith(c + ".")}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = 2
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_walker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import x\n")
    (pkg / "b.py").write_text("from . import a\nfrom p.c import y\n")
    (pkg / "c.py").write_text("")
    known = {"p", "p.a", "p.b", "p.c"}
    assert imports_of("p.a", pkg / "a.py", known) == {"p.b"}
    assert imports_of("p.b", pkg / "b.py", known) == {"p.a", "p.c"}


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("layer", ["ddad.config", "ddad.runs", "ddad.checkpoint", "ddad.runtime", "ddad.data",
                                   "ddad.backbones", "ddad.diffusion", "ddad.scoring", "ddad.metrics",
                                   "ddad.results", "ddad.engine", "ddad.export", "ddad.visualize", "ddad.report",
                                   "ddad.memory_bank"])
def test_shared_layers_import_no_method(layer):
    edges = graph()
    for name, deps in edges.items():
        if name == layer or name.startswith(layer + "."):
            methods = sorted(d for d in deps if d.startswith("ddad.methods"))
            assert not methods, f"{name} imports {methods}"


def test_modules_stay_readable():
    too_long = {name: len(path.read_text().splitlines()) for name, path in modules().items()
                if len(path.read_text().splitlines()) > 320 and name not in LONG_MODULES}
    assert not too_long, f"modules over ~300 lines without a stated reason: {too_long}"
