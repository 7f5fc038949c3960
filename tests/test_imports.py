"""The package's import graph: its folders are layers and every import (registry strings included) points down the
layer order; data flows one way (no cycles), apps never import each other, and the pure maths and the engines keep
their narrow dependencies (config → build → loop → results)."""

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "opd_lab"
APPS = {"opd_lab.train", "opd_lab.evaluate", "opd_lab.diagnose", "opd_lab.report.cli", "opd_lab.__main__",
        "opd_lab.report.__main__"}
ENTRY_POINTS = {"opd_lab.__main__": {"opd_lab.train"}, "opd_lab.report.__main__": {"opd_lab.report.cli"}}


# the package's folders, lowest first: a module imports its own folder or folders to its left, never to its right
LAYERS = ["common", "config", "core", "tasks", "models", "rollout", "diagnostic", "learner", "run", "report"]


def layer(module: str) -> int:
    """The folder's place in :data:`LAYERS`; the apps at the package's top come last (``opd_lab`` itself, an empty
    ``__init__`` that ``from opd_lab import tasks`` names, first)."""
    parts = module.split(".")
    if module == "opd_lab":
        return 0
    return LAYERS.index(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else len(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the opd_lab modules it imports (at the top or inside functions, TYPE_CHECKING included)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def registry_strings() -> dict[str, set[str]]:
    """module → the ``"opd_lab.<module>:<attr>"`` strings it holds (the lazy entries of every registry)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("opd_lab.") \
                    and ":" in node.value and " " not in node.value:
                out.setdefault(module_name(path), set()).add(node.value)
    return out


def test_every_folder_is_a_layer():
    folders = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(LAYERS), folders ^ set(LAYERS)
    top = {module_name(p) for p in PKG.glob("*.py")} - {"opd_lab"}
    assert top == {app for app in APPS if app.count(".") == 1}, top  # nothing but the apps at the top


def test_imports_point_down_the_layers():
    """A module imports from its own folder or from a folder to its left in :data:`LAYERS` (the apps from any)."""
    upward = [(m, n) for m, deps in import_graph().items() for n in deps if layer(n) > layer(m)]
    assert not upward, upward


def test_registry_strings_resolve_and_point_down():
    """Every lazy ``"module:attr"`` registry entry names an object that exists, in a layer the registering module may
    import."""
    found = registry_strings()
    assert sum(map(len, found.values())) >= 6, found  # engines, scorers, the math task
    for mod, targets in found.items():
        for target in targets:
            name, attr = target.split(":")
            assert hasattr(importlib.import_module(name), attr), target
            assert layer(name) <= layer(mod), (mod, target)


def test_the_layer_rule_can_fail():
    assert layer("opd_lab.rollout.base") < layer("opd_lab.learner.scoring") < layer("opd_lab.train")
    assert layer("opd_lab.common.registry") == 0 and layer("opd_lab.report") == len(LAYERS) - 1


def test_the_cycle_finder_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_apps_import_the_library_never_each_other():
    graph = import_graph()
    for app in APPS - set(ENTRY_POINTS):
        assert not graph[app] & APPS, (app, graph[app] & APPS)
        assert not any(app in deps for mod, deps in graph.items() if mod not in APPS), app
    for entry, apps in ENTRY_POINTS.items():  # `python -m opd_lab` is the training app, `-m opd_lab.report` the report
        assert graph[entry] & APPS == apps, entry


SCORING, LOSSES, UPDATE, TRACKING = ("opd_lab.learner.scoring", "opd_lab.core.losses", "opd_lab.learner.update",
                                     "opd_lab.run.tracking")
ROLLOUT_BASE, DISTRIBUTED = "opd_lab.rollout.base", "opd_lab.common.distributed"


@pytest.mark.parametrize("module,forbidden", [
    (ROLLOUT_BASE, {SCORING, "opd_lab.learner.heads", LOSSES, "opd_lab.config"}),
    ("opd_lab.rollout.hf", {SCORING, LOSSES, UPDATE}),
    ("opd_lab.rollout.vllm", {SCORING, LOSSES, UPDATE}),
    ("opd_lab.rollout.server", {SCORING, LOSSES, UPDATE}),
    (LOSSES, {ROLLOUT_BASE, SCORING, TRACKING, DISTRIBUTED}),
    ("opd_lab.core.gates", {ROLLOUT_BASE, SCORING, TRACKING, DISTRIBUTED}),
    ("opd_lab.core.routing", {ROLLOUT_BASE, SCORING, TRACKING, DISTRIBUTED, UPDATE}),
    ("opd_lab.config", {LOSSES, SCORING, ROLLOUT_BASE}),
])
def test_narrow_dependencies(module, forbidden):
    """Engines and scorers depend on rollout/base, never on scoring; the maths on no engine, logger or loop."""
    graph = import_graph()
    reach, todo = set(), [module]
    while todo:
        for n in graph[todo.pop()]:
            if n not in reach:
                reach.add(n)
                todo.append(n)
    assert not reach & forbidden, reach & forbidden


def external_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_maths_and_config_import_no_frameworks():
    """Losses and gates import no Hydra, wandb or vLLM; the config schemas no torch."""
    for name in ("core/losses.py", "core/gates.py"):
        assert not external_imports(PKG / name) & {"hydra", "wandb", "vllm", "omegaconf"}, name
    for path in (PKG / "config").glob("*.py"):
        assert "torch" not in external_imports(path), path
