"""The package's layers import one way, and no module imports itself back.

Imports are read from the source, as ``python3 -c "import ..."`` would never show them all: every
``import``, top-level or inside a function (a lazy import is still a dependency), and every string
constant that names a crossrank module (a lazy ``importlib.import_module`` table). A unit is a
subpackage of ``crossrank`` (``crossrank/rerank/``) or a top-level module (``crossrank/hits.py``);
``crossrank`` itself is the package's ``__init__``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "crossrank"

# Which unit may import which: the data flow of a search and a build, one way, from the shells
# down to the small value types. Training, datasets and evaluation use the core; the core never
# imports them.
BASE = {"errors", "device", "hits", "allocator"}
ALLOWED: dict[str, set[str]] = {
    # small value types
    "errors": set(),
    "device": {"errors"},
    "hits": {"errors"},
    "allocator": set(),
    # the stages
    "store": {"errors", "device"},
    "ingest": {"errors"},
    "indexes": {"errors", "device"},
    "encoders": {"errors", "device"},
    "rerank": BASE | {"encoders", "store"},
    # the pipelines
    "search": BASE | {"encoders", "indexes", "ingest", "rerank", "store"},
    "write": BASE | {"encoders", "indexes", "ingest", "store"},
    # the facade
    "api": BASE | {"encoders", "indexes", "ingest", "rerank", "store", "search", "write"},
    "crossrank": BASE | {"api", "write", "shards"},
    # an index split into shards (each a whole index), and the Ray engine over both
    "shards": BASE | {"api", "encoders", "indexes", "ingest", "rerank", "search", "store", "write"},
    "distributed": BASE
    | {"api", "encoders", "indexes", "ingest", "rerank", "search", "store", "write", "shards"},
    # users of the core
    "datasets": BASE,
    "evaluate": BASE | {"api", "rerank", "datasets", "shards", "distributed"},
    "training": BASE | {"api", "datasets", "encoders", "rerank", "store"},
    "demo": BASE | {"api", "datasets", "evaluate", "rerank", "write"},
    # the shells
    "html": BASE | {"ingest"},
    "serve": BASE | {"crossrank", "api", "encoders", "html", "store", "shards", "distributed"},
    "cli": BASE
    | {"api", "datasets", "demo", "encoders", "evaluate", "html", "serve", "store", "training"}
    | {"write", "rerank", "indexes", "search", "shards", "distributed"},
}


def _modules() -> dict[str, Path]:
    """Every crossrank module by dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module a dotted name lands on: its longest known prefix."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, *, type_checking: bool) -> Iterator[str]:
    """The crossrank modules ``module`` imports (``type_checking``: also those imported only
    under ``if TYPE_CHECKING:``, which cannot run but still say which layer a name lives in)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            test = getattr(node, "test", None) if isinstance(node, ast.If) else None
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import name`: the name may be a submodule
            names = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                for a in node.names
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # "crossrank.rerank.checkpoint" names a module; a bare "crossrank" is the product's name
            names = [node.value] if "." in node.value and node.value in MODULES else []
        for name in names:
            if name == "crossrank" or name.startswith("crossrank."):
                target = _resolve(name)
                if target is not None and target != module:
                    yield target


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "crossrank"


def test_every_unit_has_a_row_in_the_layer_table() -> None:
    units = {_unit(m) for m in MODULES if not m.startswith("crossrank.assets")}
    assert units - set(ALLOWED) == set(), "add the new subpackage or module to ALLOWED"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layer_table(module: str) -> None:
    unit = _unit(module)
    wrong = sorted(
        f"{module} imports {target}"
        for target in _imports(module, type_checking=True)
        if _unit(target) != unit and _unit(target) not in ALLOWED[unit]
    )
    assert not wrong, f"{wrong}: a lower layer must not import a higher one (see ALLOWED)"


def test_only_training_and_the_cli_import_training() -> None:
    users = {
        module
        for module in MODULES
        for target in _imports(module, type_checking=True)
        if _unit(target) == "training"
    }
    assert {_unit(m) for m in users} <= {"training", "cli"}, sorted(users)


def test_no_import_cycle_among_modules() -> None:
    edges = {m: set(_imports(m, type_checking=False)) for m in MODULES}
    cycles = _strongly_connected(edges)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _strongly_connected(edges) == [["a", "b", "c"]]


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found
