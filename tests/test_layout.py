"""The package's imports point one way: experiments -> stages -> algorithms -> shared helpers.

Reads every module under skeleton_ds/ with `ast` (nothing is imported), so it also sees imports
inside functions, and checks that the graph of imports between skeleton_ds modules has no cycle,
that the algorithm modules and the shared helpers never reach up to skeleton_ds.stages,
skeleton_ds.cli or skeleton_ds.config (shared helpers: config itself excepted), and that the shared
helpers never import an algorithm module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "skeleton_ds"

SHARED = {f"skeleton_ds.{m}" for m in ("errors", "checkpoint", "tables", "architectures", "tasks", "data", "prompt",
                                        "distributed", "ds_config", "model_identity", "quantization", "loading",
                                        "config", "ui", "plots", "preemption", "cluster", "provenance", "lineage",
                                        "packaged_models", "widths", "model_card", "stage_specs")}
BENCH_ORDER = [f"skeleton_ds.bench.{m}" for m in ("config", "cost", "fixtures", "workloads", "contenders", "timing",
                                                  "report", "run")]
"""The benchmark's modules, each importing only those before it (the package re-exports them all)."""
SERVING_ALGORITHMS = {f"skeleton_ds.serving.{m}" for m in ("multitask", "cross_task", "baselines")}
"""The serving wing's algorithms (skeleton_ds/serving/): its server and settings are the top floor."""
ALGORITHMS = {f"skeleton_ds.{m}" for m in ("attribution", "distill", "localization", "conversion", "interop",
                                            "inference", "bench", "verify", "static_shapes")} | set(BENCH_ORDER) \
    | SERVING_ALGORITHMS
# The package itself, the command line and the HTTP server; the stages are skeleton_ds.stages.*
TOP = {"skeleton_ds", "skeleton_ds.__main__", "skeleton_ds.cli", "skeleton_ds.serving", "skeleton_ds.serving.server",
       "skeleton_ds.serving.settings", "skeleton_ds.serving.mix_rule"}
EXPERIMENTS = "skeleton_ds.experiments"
"""Beside the library: it imports the library, and nothing in the library imports it but the CLI (`reproduce`)."""
FORBIDDEN_BELOW_STAGES = ("skeleton_ds.stages", "skeleton_ds.cli", "skeleton_ds.config")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The skeleton_ds modules that `tree` (the module `name`) imports anywhere, functions included.
    `from P import x` counts as importing P.x when that is a module, else P."""
    found = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "skeleton_ds" or target.startswith("skeleton_ds."):
                # `import skeleton_ds.a.b` names a module; an unknown tail (a name, a typo) falls back to its parent
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def in_experiments(module: str) -> bool:
    return module == EXPERIMENTS or module.startswith(EXPERIMENTS + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        if not in_experiments(module) and module != "skeleton_ds.cli":
            bad += [f"{module} imports {t}: the library does not import the experiments (only the CLI does)"
                    for t in sorted(targets) if in_experiments(t)]
        if module in SHARED | ALGORITHMS:
            for target in sorted(targets):
                if any(target == f or target.startswith(f + ".") for f in FORBIDDEN_BELOW_STAGES):
                    bad.append(f"{module} imports {target}: algorithms and shared helpers must not import stages, "
                               f"the CLI or the Config")
        if module in SHARED:
            bad += [f"{module} imports {t}: shared helpers must not import algorithm modules"
                    for t in sorted(targets & ALGORITHMS)]
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_the_package(graph):
    assert {"skeleton_ds.stages.pipeline", "skeleton_ds.attribution", "skeleton_ds.checkpoint"} <= set(graph)
    assert "skeleton_ds.attribution" in graph["skeleton_ds.stages.attribute"]
    assert "skeleton_ds.stages.pipeline" in graph["skeleton_ds.cli"]  # an import inside a function
    assert "skeleton_ds.checkpoint" in graph["skeleton_ds.conversion"]  # `from skeleton_ds import checkpoint`


def test_every_module_has_a_layer(graph):
    unplaced = [m for m in graph if m not in SHARED | ALGORITHMS | TOP and not m.startswith("skeleton_ds.stages")
                and not in_experiments(m)]
    assert not unplaced, f"place these modules in a layer in tests/test_layout.py and README 'Layout': {unplaced}"


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down(graph):
    assert layer_violations(graph) == []


def test_the_benchmark_modules_import_in_one_order(graph):
    assert {m for m in graph if m.startswith("skeleton_ds.bench.")} == set(BENCH_ORDER)
    upward = [f"{m} imports {t}" for i, m in enumerate(BENCH_ORDER) for t in sorted(graph[m])
              if t in BENCH_ORDER[i:] or t == "skeleton_ds.bench"]
    assert not upward, f"the benchmark's modules import only those before them in BENCH_ORDER: {upward}"


def test_checks_catch_violations(tmp_path):
    """The checks themselves: a stage import added inside a function of an algorithm module, a shared
    helper importing an algorithm, and a cycle are all reported."""
    root = tmp_path / "skeleton_ds"
    (root / "stages").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "stages" / "__init__.py").write_text("")
    (root / "stages" / "common.py").write_text("from skeleton_ds import attribution\n")
    (root / "attribution.py").write_text("def f():\n    from skeleton_ds.stages.common import subset\n")
    (root / "checkpoint.py").write_text("from . import localization\n")
    (root / "localization.py").write_text("import skeleton_ds.checkpoint\n")
    (root / "experiments").mkdir()
    (root / "experiments" / "__init__.py").write_text("")
    (root / "experiments" / "study.py").write_text("from skeleton_ds.stages import common\n")  # allowed
    (root / "stages" / "plan.py").write_text("from skeleton_ds.experiments import study\n")  # not allowed
    graph = import_graph(root)
    assert graph["skeleton_ds.attribution"] == {"skeleton_ds.stages.common"}
    assert layer_violations(graph) == [
        "skeleton_ds.attribution imports skeleton_ds.stages.common: algorithms and shared helpers must not import "
        "stages, the CLI or the Config",
        "skeleton_ds.checkpoint imports skeleton_ds.localization: shared helpers must not import algorithm modules",
        "skeleton_ds.stages.plan imports skeleton_ds.experiments.study: the library does not import the experiments "
        "(only the CLI does)"]
    assert find_cycle(graph) == ["skeleton_ds.attribution", "skeleton_ds.stages.common", "skeleton_ds.attribution"]
    del graph["skeleton_ds.attribution"]
    assert find_cycle(graph) == ["skeleton_ds.checkpoint", "skeleton_ds.localization", "skeleton_ds.checkpoint"]
