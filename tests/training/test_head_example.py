"""docs/architecture.md's "Adding a score head" is code that works: the module it shows builds a head
on a run and scores frames, and its registry line is the real one plus the new list."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TinyRun  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "### Adding a score head"


def example_blocks() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_documented_head_builds_and_scores_a_tiny_run(tmp_path: Path, tiny_run: TinyRun) -> None:
    from training.heads.base import HeadSpec

    module, _ = example_blocks()
    namespace: dict[str, object] = {"__name__": "example_head"}
    exec(compile(module, "docs/architecture.md", "exec"), namespace)
    (spec,) = namespace["KL_HEADS"]  # type: ignore[misc]
    assert isinstance(spec, HeadSpec) and spec.name == "vae-kl" and spec.kind == "vae" and spec.fit is None
    run = tiny_run("vae", tmp_path, seg_steps=0)
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        score = spec.build(run)(torch.from_numpy(frames))
    assert score.shape == (3,) and bool(torch.isfinite(score).all()) and bool((score >= 0).all())


def registry_lists(code: str) -> list[str]:
    """The lists concatenated into ``HEADS`` by ``code``, in order."""
    for node in ast.walk(ast.parse(code)):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "HEADS" for t in targets):
            assert isinstance(node.value, ast.List)
            return [ast.unparse(element) for element in node.value.elts]
    raise AssertionError("no HEADS = [...] in the code")


def test_the_documented_registry_line_is_the_real_one_plus_the_new_list() -> None:
    _, registry = example_blocks()
    real = (ROOT / "training" / "heads" / "__init__.py").read_text(encoding="utf-8")
    assert registry_lists(registry) == [*registry_lists(real), "*KL_HEADS"]
