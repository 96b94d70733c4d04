"""Dependencies run one way: the memory planner reads plans, policy and rules, never the engine.

The planner must predict the runtime from the same declarations (plan, rule
state, precision policy), not by importing the engine's internals; and the
engine must not depend on the planner. Checked on the import statements of
every module, so a new import that breaks the direction fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import shardopt

PACKAGE = Path(shardopt.__file__).parent
PLANNER = {"memory", "memory_plan", "presets", "architectures", "activations", "cli"}
ENGINE_INTERNALS = {"hooks", "buffers", "comm", "matrix_step", "zero_optimizer", "checkpoint"}


def _imports(module: str) -> set[str]:
    """First-level shardopt modules that ``shardopt/<module>.py`` imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.startswith("shardopt."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("shardopt."))
    return found


def test_the_planner_does_not_import_engine_internals():
    for module in sorted(PLANNER):
        assert not (_imports(module) & ENGINE_INTERNALS), f"{module} imports {_imports(module) & ENGINE_INTERNALS}"


def test_the_engine_does_not_import_the_planner():
    engine = {path.stem for path in PACKAGE.glob("*.py")} - PLANNER - {"__init__"}
    for module in sorted(engine):
        assert not (_imports(module) & PLANNER), f"{module} imports {_imports(module) & PLANNER}"


def test_the_checker_sees_imports():
    # The rule above would pass vacuously if _imports found nothing.
    assert {"plan", "policy"} <= _imports("memory_plan")
    assert {"hooks", "comm", "policy"} <= _imports("zero_optimizer")
