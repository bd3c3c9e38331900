"""The package's shape: one direction of dependency, no import cycles, rooms that stay rooms.

Imports are read from the source (function-level ones included), so a cycle hidden
inside a function body counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "anchorless"
PLATFORM = "anchorless.platform"
# Inside the platform, a wing may import only those below it (A ← B: B imports A).
ALLOWED = {
    "data": set(),
    "tracking": {"data"},
    "models": {"data", "tracking"},
    "evaluation": {"data", "tracking", "models"},
    "registry": {"data", "tracking", "models", "evaluation"},
    "training": {"data", "tracking", "models", "evaluation"},
    "tuning": {"data", "tracking", "models", "training"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the anchorless modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parents + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _imports(_modules())


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_module_imports_itself_back_through_others(graph):
    assert _cycle(graph) is None


def test_detectors_import_no_ray_deepspeed_mlflow_and_nothing_of_the_platform():
    for path in (PACKAGE / "detectors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            for name in names:
                root = name.split(".")[0]
                assert root not in ("ray", "deepspeed", "mlflow"), f"{path}: imports {name}"
                assert not name.startswith(("anchorless.platform", "anchorless.jobs", "anchorless.cluster")), path


def test_the_cluster_and_the_platform_never_import_the_command_line(graph):
    for module, targets in graph.items():
        if module.startswith(("anchorless.platform", "anchorless.cluster", "anchorless.detectors")):
            assert not any(t.startswith("anchorless.jobs") for t in targets), module
        if module.startswith("anchorless.cluster"):
            assert not any(t.startswith(PLATFORM) for t in targets), module


def test_platform_wings_import_only_the_wings_below_them(graph):
    for module, targets in graph.items():
        if not module.startswith(PLATFORM + "."):
            continue
        wing = module.split(".")[2]
        for target in targets:
            if not target.startswith(PLATFORM + "."):
                continue
            other = target.split(".")[2]
            if other == wing or other not in ALLOWED:  # the common ground is open to all
                continue
            # ... and itself imports no wing.
            assert wing in ALLOWED and other in ALLOWED[wing], f"{module} imports {target}"


def test_the_top_of_the_platform_is_only_its_common_ground():
    top = sorted(path.stem for path in (PACKAGE / "platform").glob("*.py") if path.stem != "__init__")
    assert len(top) <= 6, top
    wings = sorted(path.name for path in (PACKAGE / "platform").iterdir() if (path / "__init__.py").is_file())
    assert set(wings) == set(ALLOWED)
