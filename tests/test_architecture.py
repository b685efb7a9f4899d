"""The layout's rules, read from the source: no import loops among fedmoe modules, and
dependencies point down (simulations -> server/client -> shared -> protos)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"shared": "fedmoe.shared", "client": "fedmoe.client", "server": "fedmoe.server",
            "simulations": "fedmoe.simulations", "protos": "fedmoe.protos"}
# who may import whom (besides itself): the layers of docs/ARCHITECTURE.md
ALLOWED = {
    "fedmoe.protos": set(),
    "fedmoe.shared": {"fedmoe.protos"},
    "fedmoe.client": {"fedmoe.shared", "fedmoe.protos"},
    "fedmoe.server": {"fedmoe.shared", "fedmoe.protos"},
    "fedmoe.simulations": {"fedmoe.server", "fedmoe.client", "fedmoe.shared", "fedmoe.protos"},
}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imported(name: str, path: Path, known: dict) -> set[str]:
    """fedmoe modules `name` imports anywhere in its body (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    found = set()
    for n in names:
        while n and n not in known:
            n = n.rpartition(".")[0]
        if n and n != name:
            found.add(n)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_imports_and_loops():
    g = graph()
    assert "fedmoe.shared.errors" in g["fedmoe.shared.data"]  # a top-level import
    assert "fedmoe.server.federation.run_store" in g["fedmoe.server.ops.dashboard"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_loops_among_fedmoe_modules():
    assert cycles(graph()) == []


def test_dependencies_point_down():
    wrong = [f"{m} imports {d}" for m, deps in graph().items() for d in sorted(deps)
             if package_of(d) != package_of(m) and package_of(d) not in ALLOWED[package_of(m)]]
    assert wrong == []


def test_each_package_registers_its_commands_in_one_place():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    eps = project["entry-points"]["fedmoe.commands"]
    assert set(eps) == {"shared", "client", "simulations", "server"}
    for name, target in eps.items():
        module = target.split(":")[0]
        assert module in modules(), target
    # no stray *_cli.py beside modules: commands live in the package's commands module
    assert sorted(str(p.relative_to(ROOT)) for f in PACKAGES for p in (ROOT / f).rglob("*_cli.py")) == []
