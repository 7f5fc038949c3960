"""The package's import graph: data flows one way (no cycles), apps never import each other, and the pure maths
and the engines keep their narrow dependencies (STYLE.md: config → build → loop → results)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "opd_lab"
APPS = {"opd_lab.train", "opd_lab.evaluate", "opd_lab.diagnose", "opd_lab.report", "opd_lab.__main__"}


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


def test_the_cycle_finder_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_apps_import_the_library_never_each_other():
    graph = import_graph()
    for app in APPS - {"opd_lab.__main__"}:
        assert not graph[app] & APPS, (app, graph[app] & APPS)
        assert not any(app in deps for mod, deps in graph.items() if mod not in APPS), app
    assert graph["opd_lab.__main__"] & APPS == {"opd_lab.train"}  # `python -m opd_lab` is the training app


@pytest.mark.parametrize("module,forbidden", [
    ("opd_lab.rollout.base", {"opd_lab.scoring", "opd_lab.heads", "opd_lab.losses", "opd_lab.config"}),
    ("opd_lab.rollout.hf", {"opd_lab.scoring", "opd_lab.losses", "opd_lab.update"}),
    ("opd_lab.rollout.vllm", {"opd_lab.scoring", "opd_lab.losses", "opd_lab.update"}),
    ("opd_lab.rollout.server", {"opd_lab.scoring", "opd_lab.losses", "opd_lab.update"}),
    ("opd_lab.losses", {"opd_lab.rollout.base", "opd_lab.scoring", "opd_lab.tracking", "opd_lab.distributed"}),
    ("opd_lab.gates", {"opd_lab.rollout.base", "opd_lab.scoring", "opd_lab.tracking", "opd_lab.distributed"}),
    ("opd_lab.routing", {"opd_lab.scoring", "opd_lab.tracking", "opd_lab.distributed", "opd_lab.update"}),
    ("opd_lab.config", {"opd_lab.losses", "opd_lab.scoring", "opd_lab.rollout.base"}),
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
    for name in ("losses.py", "gates.py"):
        assert not external_imports(PKG / name) & {"hydra", "wandb", "vllm", "omegaconf"}, name
    for path in (PKG / "config").glob("*.py"):
        assert "torch" not in external_imports(path), path
