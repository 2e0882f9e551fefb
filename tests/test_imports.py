"""The package layout's import rules, read from the source: packages import one way (no cycle between them), and
the pure packages import without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

PACER = Path(__file__).resolve().parents[1] / "pacer"
PURE = ("scheduling", "kv", "latency", "sim", "speculation")  # STYLE.md: their tests run in milliseconds, without torch


def node(module: str) -> str | None:
    """The graph node of a module: its subpackage (`scheduling`), or the top-level module (`request`, `cli`), or
    `pacer` for the package's own __init__; None outside pacer."""
    parts = module.split(".")
    if parts[0] != "pacer":
        return None
    return parts[1] if len(parts) > 1 else "pacer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Ids of the nodes under `if TYPE_CHECKING:` (annotations only, never run)."""
    skipped = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and getattr(n.test, "id", getattr(n.test, "attr", None)) == "TYPE_CHECKING":
            skipped |= {id(m) for b in n.body for m in ast.walk(b)}
    return skipped


def imported_modules(path: Path) -> set[str]:
    """Every pacer module `path` imports, at the top or inside functions; `from pacer import x` counts as
    pacer.x where x is a module or package, else as pacer itself."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    found = set()
    for n in ast.walk(tree):
        if id(n) in skipped:
            continue
        if isinstance(n, ast.Import):
            found |= {alias.name for alias in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            if n.module == "pacer":
                found |= {f"pacer.{a.name}" if (PACER / a.name).is_dir() or (PACER / f"{a.name}.py").is_file()
                          else "pacer" for a in n.names}
            else:
                found.add(n.module)
        elif isinstance(n, ast.ImportFrom) and n.level:
            raise AssertionError(f"{path}: relative import; pacer imports by absolute name")
    return {m for m in found if node(m) is not None}


def package_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """node -> the nodes it imports, and for each edge one import that makes it (for the message)."""
    edges: dict[str, set[str]] = defaultdict(set)
    witness: dict[tuple[str, str], str] = {}
    for path in sorted(PACER.rglob("*.py")):
        source = module_name(path)
        for target in imported_modules(path):
            a, b = node(source), node(target)
            if a != b:
                edges[a].add(b)
                witness.setdefault((a, b), f"{source} imports {target}")
    return edges, witness


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = "open"
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        path.pop()
        state[v] = "done"
        return None

    for v in sorted(edges):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_should():
    edges, _ = package_graph()
    assert {"kv", "latency", "request", "config"} <= edges["scheduling"]
    assert "engine" in edges["sim"] and "scheduling" in edges["engine"]
    assert "engine" in edges["cli"]  # imported inside a function
    assert "scheduling" not in edges["latency"]  # the latency model knows batch shapes, not plans
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_packages():
    edges, witness = package_graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle) + "\n" + "\n".join(
        witness[a, b] for a, b in pairwise(cycle))


def test_the_pure_packages_import_without_torch():
    modules = [module_name(path) for package in PURE for path in sorted((PACER / package).rglob("*.py"))]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, f'importing {name} loaded torch'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACER.parent, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
