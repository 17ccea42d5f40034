"""The shape of the code: no import cycle (module or package level), no library module that
imports the command line, no private name used outside its module (an AST scan of robustlab/)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "robustlab"
# the one module allowed to touch Optuna's private APIs (pinned and tested in test_optuna_compat)
PRIVATE_API_ADAPTERS = {"robustlab.launch.optuna_compat"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """robustlab modules `name` imports, anywhere in the file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _unit(module: str) -> str:
    """The package-level unit: robustlab.<subpackage> or robustlab.<top-level module>."""
    return ".".join(module.split(".")[:2])


def test_the_scan_sees_the_whole_package():
    assert len(MODULES) > 50 and "robustlab.train.runner" in MODULES
    assert "robustlab.train.loop" in EDGES["robustlab.train.runner"]  # an edge it must find


def test_no_import_cycle_between_modules():
    assert _cycles(EDGES) == []


def test_no_import_cycle_between_packages():
    units: dict[str, set[str]] = defaultdict(set)
    for module, targets in EDGES.items():
        units[_unit(module)].update(_unit(t) for t in targets if _unit(t) != _unit(module))
    units.pop("robustlab", None)  # the package's own __init__ (a docstring and a version)
    assert _cycles(units) == []


def test_no_library_module_imports_the_command_line():
    offenders = {
        module: sorted(t for t in targets if t.startswith(("robustlab.commands", "robustlab.cli")))
        for module, targets in EDGES.items()
        if not module.startswith(("robustlab.commands", "robustlab.cli"))
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_no_private_name_is_used_outside_its_module():
    """`from robustlab.x import _y`, `module._y` and `obj._y` (anything but self/cls) outside
    the one adapter module are refused."""
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found += [
                    f"{name}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and name not in PRIVATE_API_ADAPTERS
            ):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_the_command_line_and_the_leaders_import_no_tensorflow():
    """Option checks, the experiment's leader and tune's and register's set-up run before (or
    without) TensorFlow: a bad option answers at once, a leader stays small."""
    import subprocess
    import sys

    code = (
        "import sys, robustlab.cli as c; c.build_parser()\n"
        "import robustlab.experiment.run, robustlab.tune.run, robustlab.register.candidates\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
