"""Dependencies run one way: planner -> zero's plan data and policy -> rules; the engine never the planner.

The planner must predict the runtime from the same declarations (plan, rule
state, precision policy), not by importing the engine's runtime; the engine
must not depend on the planner; the rules depend on neither; and no two
modules import each other. Checked on the import statements of every module,
so a new import that breaks the direction fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import shardopt

PACKAGE = Path(shardopt.__file__).parent
# What the planner may read of the engine: pure data and declarations, no tensors or process groups.
# The engine's modules the planner may read: no process group in them. (The pool's
# ledger is pure; the planner replays it to size the runtime's buffer pool.)
ZERO_DATA = {"shardopt.zero.plan", "shardopt.zero.layout", "shardopt.zero.schedule", "shardopt.zero.policy",
             "shardopt.zero.pool"}
DEPRECATED_ALIASES = {"shardopt.memory"}
# The command line sits above everything: it dispatches to the planner and to checkpoints.
ENTRY_POINTS = {"shardopt.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The shardopt modules (fully qualified) that ``module`` imports, where they exist as modules."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("shardopt"):
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules or {target}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("shardopt")}
    return found - {module}


def test_the_planner_reads_only_the_engines_plan_data_and_policy():
    for module in sorted(m for m in MODULES if m.startswith("shardopt.planner")):
        engine = {m for m in _imports(module) if m.startswith("shardopt.zero")}
        assert engine <= ZERO_DATA, f"{module} imports {sorted(engine - ZERO_DATA)}"


def test_nothing_but_the_planner_imports_the_planner():
    for module in sorted(m for m in MODULES if not m.startswith("shardopt.planner")):
        if module in DEPRECATED_ALIASES | ENTRY_POINTS:
            continue
        planner = {m for m in _imports(module) if m.startswith("shardopt.planner")}
        assert not planner, f"{module} imports {sorted(planner)}"


def test_the_plan_data_and_the_rules_do_not_import_the_runtime():
    runtime = {m for m in MODULES if m.startswith("shardopt.zero")} - ZERO_DATA - {"shardopt.zero"}
    for module in sorted((ZERO_DATA & MODULES.keys()) | {m for m in MODULES if m.startswith("shardopt.rules")}):
        assert not (_imports(module) & runtime), f"{module} imports {sorted(_imports(module) & runtime)}"
    for module in sorted(m for m in MODULES if m.startswith("shardopt.rules")):
        outside = {m for m in _imports(module) if not m.startswith("shardopt.rules")}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_no_import_cycles():
    graph = {m: _imports(m) & MODULES.keys() for m in MODULES}
    # Packages import their own modules to form their public surface; that is not a cycle.
    for module in graph:
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            assert state.get(other) != 1, f"import cycle: {' -> '.join([*path, module, other])}"
            if other not in state:
                visit(other, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_checker_sees_imports():
    # The rules above would pass vacuously if _imports found nothing.
    assert {"shardopt.zero.plan", "shardopt.zero.policy"} <= _imports("shardopt.planner.accounting")
    assert {"shardopt.zero.reducer", "shardopt.zero.comm", "shardopt.rules.base"} <= _imports(
        "shardopt.zero.optimizer")
    assert "shardopt.planner.report" in _imports("shardopt.planner")


def test_public_paths_of_the_previous_release_still_work():
    import warnings

    import pytest

    from shardopt import dist, planner
    from shardopt.planner.cli import main

    assert shardopt.ZeroOptimizer.__module__ == "shardopt.zero.optimizer"
    assert shardopt.plan_shards.__module__ == "shardopt.zero.layout"
    assert callable(dist.init_from_env)
    from shardopt import memory

    with pytest.warns(DeprecationWarning, match=r"shardopt\.memory\.estimate is deprecated; use shardopt\.planner"):
        estimate = memory.estimate
    assert estimate is planner.estimate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["plan", "--model", "llama2-7b", "--dp", "8"]) == 0
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        memory.nothing  # noqa: B018
