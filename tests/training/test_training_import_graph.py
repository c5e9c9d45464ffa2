"""training/ imports form a tree, not a web: no module reaches itself through its imports.

Every import statement counts, including those inside functions (a lazy import still ties two
modules together; it only hides the cycle until the call). An import of ``training.x.y`` is an edge
to ``training.x.y``; the implicit import of the parent package that Python adds is not, since a
package's ``__init__`` importing its own submodules is the registry pattern (training/heads/).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ROOT / "training"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def training_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(TRAINING.rglob("*.py"))}


def imported(path: Path, name: str, modules: set[str]) -> set[str]:
    """The training modules ``path`` (module ``name``) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from training.heads import vae` imports the submodule training.heads.vae
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = training_modules()
    return {name: imported(path, name, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_of_training_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "training.heads" in graph["training.evaluate"]  # imported inside evaluate_run
    assert "training.heads.combo" in graph["training.heads"]


def test_the_cycle_finder_finds_a_lazy_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_head_modules_never_import_the_registry() -> None:
    """Each head family ends in its list; only heads/__init__.py concatenates them."""
    graph = import_graph()
    for name in graph:
        if name.startswith("training.heads."):
            assert "training.heads" not in graph[name], name
