"""The module map of README's Design section, enforced: every dtl module sits in a tier, imports only from
its own tier or below (data flows downhill: cli -> run -> components -> foundation), the import graph has
no cycle, and no dtl import hides inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

DTL = Path(__file__).resolve().parents[2] / "dtl"

#: README "Design": which module owns what, tier by tier (lowest first).
TIERS: dict[str, tuple[str, ...]] = {
    "foundation": ("__init__", "errors", "signals", "testing", "splits", "augment", "geometric", "autoaugment",
                   "erasing", "checks", "augchain", "preprocessing", "config", "settings", "dist", "progress"),
    "components": ("timm_backbones", "pooling", "models", "cifar", "images", "checkpoint", "optim", "precision",
                   "metrics", "folder", "features", "evaluate", "samplers", "data", "rundir", "ema", "checkpointer",
                   "mix", "trackers"),
    "run": ("state", "setup", "loop", "engine"),
    "tools": ("inference", "predict", "export", "reference", "bench_report", "bench_input", "bench",
              "doctor"),
    "entry": ("cli", "__main__"),
}
RANK = {m: i for i, mods in enumerate(TIERS.values()) for m in mods}


def imports_of(path: Path) -> tuple[set[str], list[str]]:
    """(dtl modules imported, descriptions of function-level dtl imports)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    nested: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dtl":
            names = ([a.name for a in node.names] if node.module == "dtl" else [node.module.split(".")[1]])
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("dtl.")]
        names = [n for n in names if (DTL / f"{n}.py").is_file()]
        found.update(names)
        if names and in_function:
            nested.append(f"{path.name}:{node.lineno} imports {', '.join(names)} inside a function")
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    found.discard(path.stem)
    return found, nested


def graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p)[0] for p in sorted(DTL.glob("*.py"))}


def test_every_module_has_a_tier():
    modules = {p.stem for p in DTL.glob("*.py")}
    assert modules - set(RANK) == set(), "place new modules in TIERS (and README's Design section)"
    assert set(RANK) - modules == set(), "TIERS names a module that does not exist"


def test_imports_flow_downhill():
    upward = [f"{m} ({tier_of(m)}) imports {d} ({tier_of(d)})" for m, deps in graph().items() for d in deps
              if RANK[d] > RANK[m]]
    assert upward == []


def tier_of(module: str) -> str:
    return next(t for t, mods in TIERS.items() if module in mods)


def test_no_import_cycles():
    edges = graph()
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
    assert cycles == []


def test_no_dtl_imports_inside_functions():
    nested = [line for p in sorted(DTL.glob("*.py")) for line in imports_of(p)[1]]
    assert nested == []


def test_the_checker_sees_cycles_and_upward_imports(tmp_path, monkeypatch):
    """The checks can fail: a planted cycle and an upward import are reported."""
    pkg = tmp_path / "dtl"
    pkg.mkdir()
    (pkg / "errors.py").write_text("from dtl import cli\n")
    (pkg / "cli.py").write_text("def f():\n    from dtl import errors\n")
    import tests.unit.test_layers as me

    monkeypatch.setattr(me, "DTL", pkg)
    edges = me.graph()
    assert edges == {"cli": {"errors"}, "errors": {"cli"}}
    assert me.imports_of(pkg / "cli.py")[1] == ["cli.py:2 imports errors inside a function"]
    assert RANK["cli"] > RANK["errors"]  # errors -> cli is upward
