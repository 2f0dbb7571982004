"""The code's shape, as the developers' guide asks it: lines of at most 120 characters, functions of at most 60
lines, classes of at most 250, and imports that only look down: every minitir module imports only modules of a
lower floor, also inside functions. FLOORS is the map of the library, bottom first (what a step passes on
stands below what makes it: grading below the rollouts that call it, the update below the loop)."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick
PACKAGE = Path(__file__).resolve().parents[1] / "minitir"
FLOORS = [
    # what stands alone: kernels, the data each step passes on, the sandbox, tasks and the RL formulas
    {"ops", "attention", "sample", "vocab", "cli", "distributed", "filters", "roc", "rl", "evaluate",
     "tool_protocol", "sandbox", "tasks"},
    {"model", "sampling", "logprobs", "reward", "batching"},        # the model; grading; packing samples
    {"lora", "generate"},                                           # adapters; the generator
    {"checkpoint", "config", "rollout", "plot"},                    # files; settings; rollouts; figures
    {"miniature", "learner", "run_state", "ablation"},              # the base model; the update; runs; grids
    {"trainer"},                                                    # the loop
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.relative_to(PACKAGE).with_suffix("").parts


def test_lines_functions_and_classes_stay_small():
    too_long = []
    for path, _ in modules():
        text = path.read_text()
        too_long += [f"{path.name}:{i} is {len(line)} characters" for i, line in enumerate(text.splitlines(), 1)
                     if len(line) > 120]
        for node in ast.walk(ast.parse(text)):
            limit = 60 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
                250 if isinstance(node, ast.ClassDef) else None
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.name}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def imported(tree: ast.Module, parts: tuple[str, ...]) -> set[str]:
    """The top-level minitir modules (minitir.sandbox counts as one) a module's code imports, anywhere in it."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "minitir" \
                else [node.module]
        elif isinstance(node, ast.ImportFrom):   # relative: from the module's package, node.level up
            where = ("minitir",) + parts[:-node.level] + tuple(filter(None, (node.module or "").split(".")))
            names = [".".join(where)] if len(where) > 1 else [f"minitir.{a.name}" for a in node.names]
        out |= {n.split(".")[1] for n in names if n.startswith("minitir.")}
    return out


def test_every_import_looks_down():
    names = {parts[0] for _, parts in modules() if parts[0] != "__init__"}
    assert names == set(FLOOR), f"FLOORS must place every module: {sorted(names ^ set(FLOOR))}"
    upward = []
    for path, parts in modules():
        if parts[0] == "__init__":
            continue
        for dep in imported(ast.parse(path.read_text()), parts) - {parts[0]}:
            assert dep in FLOOR, f"{'/'.join(parts)}.py imports minitir.{dep}, which FLOORS does not place"
            if FLOOR[dep] >= FLOOR[parts[0]]:
                upward.append(f"{'/'.join(parts)}.py imports {dep} (floor {FLOOR[dep]} >= {FLOOR[parts[0]]})")
    assert not upward, upward
