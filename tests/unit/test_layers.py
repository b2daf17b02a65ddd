"""The package map of ARCHITECTURE.md, enforced: every dtl module belongs to a package, a package imports only
from packages ranked below it (data flows downhill: entry -> tools -> train -> models -> data -> distributed ->
config -> foundation), the module import graph has no cycle, and no dtl import hides inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

DTL = Path(__file__).resolve().parents[2] / "dtl"

#: ARCHITECTURE.md: the packages, lowest first. A top-level module counts as its own package.
PACKAGES: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "faults", "atomic_files"),
    ("config",),
    ("distributed",),
    ("data",),
    ("models",),
    ("train",),
    ("tools",),
    ("cli",),
)
RANK = {name: i for i, names in enumerate(PACKAGES) for name in names}


def module_name(path: Path, root: Path) -> str:
    """`dtl/train/loop.py` -> `dtl.train.loop`; a package's `__init__.py` is the package itself."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


def package_of(module: str) -> str:
    """`dtl.train.loop` -> `train`; `dtl.errors` -> `errors`; `dtl` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(dtl modules imported, descriptions of function-level dtl imports). `from dtl.x import y` counts as an
    import of `dtl.x.y` when that is a module, else of `dtl.x`."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    nested: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dtl":
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "dtl"]
        names = [n for n in names if n in known]
        found.update(names)
        if names and in_function:
            nested.append(f"{path.name}:{node.lineno} imports {', '.join(sorted(set(names)))} inside a function")
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found, nested


def graph(root: Path = DTL) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {name: imports_of(path, known)[0] - {name} for name, path in found.items()}


def test_every_package_has_a_rank():
    packages = {package_of(m) for m in modules(DTL)}
    assert packages - set(RANK) == set(), "place new packages (or top-level modules) in PACKAGES and ARCHITECTURE.md"
    assert set(RANK) - packages == set(), "PACKAGES names a package that does not exist"


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({package_of(m)}) imports {d} ({package_of(d)})" for m, deps in sorted(edges.items())
            for d in sorted(deps) if RANK[package_of(d)] > RANK[package_of(m)]]


def cycles_of(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                dfs(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            dfs(module, [module])
    return cycles


def test_packages_import_only_downhill():
    assert upward_imports(graph()) == []


def test_no_import_cycles():
    assert cycles_of(graph()) == []


def test_no_dtl_imports_inside_functions():
    found = modules(DTL)
    nested = [line for p in found.values() for line in imports_of(p, set(found))[1]]
    assert nested == []


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    """The checks can fail: a planted cycle, an upward import across packages and a function-level import are
    reported; an import within a package is not upward."""
    pkg = tmp_path / "dtl"
    (pkg / "train").mkdir(parents=True)
    (pkg / "data").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from dtl.train import loop\n")
    (pkg / "train" / "loop.py").write_text("from dtl import errors\nfrom dtl.train import state\n")
    (pkg / "train" / "state.py").write_text("")
    (pkg / "data" / "folder.py").write_text("def f():\n    from dtl.train.state import X\n")
    edges = graph(pkg)
    assert edges["dtl.errors"] == {"dtl.train.loop"} and edges["dtl.train.loop"] == {"dtl.errors", "dtl.train.state"}
    assert upward_imports(edges) == ["dtl.data.folder (data) imports dtl.train.state (train)",
                                     "dtl.errors (errors) imports dtl.train.loop (train)"]
    assert cycles_of(edges) == [["dtl.errors", "dtl.train.loop", "dtl.errors"]]
    known = set(modules(pkg))
    assert imports_of(pkg / "data" / "folder.py", known)[1] == ["folder.py:2 imports dtl.train.state inside a function"]
