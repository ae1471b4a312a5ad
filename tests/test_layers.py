"""Imports only point down the layers (issue 10), checked on the source so that a new upward import fails CI.

contract, errors -> checks, files -> manifest -> exporter | engines -> runtime -> tools -> plans -> serving -> cli (a package
imports only from lower layers, never sideways). Lazy imports inside functions count too: they are cycles all the
same, only deferred.
"""
from __future__ import annotations

import ast
from pathlib import Path

import dlexport

RANK = {"__init__": 0, "contract": 0, "errors": 0, "checks": 1, "files": 1, "manifest": 2, "exporter": 3,
        "engines": 3, "runtime": 4, "validation": 5, "tools": 5, "plans": 6, "pipeline": 6, "serving": 7,
        "cli": 8,
        "__main__": 9}
# Upward imports that remain, each with the reason; the list may only shrink.
KNOWN = {
}


def _imports():
    root = Path(dlexport.__file__).parent
    for path in root.rglob("*.py"):
        mod = ".".join(("dlexport",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("dlexport"):
                    yield mod, target
            elif isinstance(node, ast.Import):
                yield from ((mod, a.name) for a in node.names if a.name.startswith("dlexport"))


def _unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    root = Path(dlexport.__file__).parent
    units = {p.stem if p.is_file() else p.name for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert units <= set(RANK), f"give {sorted(units - set(RANK))} a layer in RANK"


def test_imports_point_down():
    wrong = set()
    for mod, target in _imports():
        a, b = _unit(mod), _unit(target)
        if a != b and RANK[b] >= RANK[a] and (mod, b) not in KNOWN and b != "__init__":
            wrong.add(f"{mod} imports {target} ({a} is layer {RANK[a]}, {b} is layer {RANK[b]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_known_exceptions_still_exist():
    """An exception that was fixed is removed from KNOWN, so it cannot silently come back."""
    found = {(mod, _unit(target)) for mod, target in _imports()}
    assert set(KNOWN) <= found, sorted(set(KNOWN) - found)


def _module_graph() -> dict[str, set[str]]:
    """module -> the dlexport modules it imports (``from pkg import name`` counts as pkg.name when that is a module)."""
    root = Path(dlexport.__file__).parent
    modules = {".".join(("dlexport",) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
               for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in root.rglob("*.py"):
        mod = ".".join(("dlexport",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + [node.module or ""])
                        .rstrip(".") if node.level else node.module or "")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in modules else base
                    if target in modules and target != mod:
                        graph[mod].add(target)
            elif isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name in modules and a.name != mod)
    return graph


def test_no_module_imports_itself_through_others():
    """No import cycle between modules, lazy imports included (a package's __init__ re-exporting is not a cycle
    by itself, so packages are left out: their modules are checked)."""
    graph = _module_graph()
    packages = {m for m in graph if any(o.startswith(m + ".") for o in graph)}
    edges = {m: {t for t in ts if t not in packages} for m, ts in graph.items() if m not in packages}
    cycles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    known = {frozenset(c.split(" <-> ")) for c in KNOWN_CYCLES}
    new = [" -> ".join(c + c[:1]) for c in cycles if frozenset(c) not in known]
    assert not new, "\n".join(new)


KNOWN_CYCLES: dict = {}  # the list may only shrink
