"""contract/ is what training and service share, so it must import without torch, FastAPI or ORT.

The check runs in a fresh interpreter: in the test process another test may already have imported
torch, which would hide a stray import.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import contract

FORBIDDEN = ("torch", "fastapi", "onnxruntime", "training", "service")


def _contract_modules() -> list[str]:
    return sorted(f"contract.{info.name}" for info in pkgutil.iter_modules(contract.__path__))


def test_the_contract_package_has_its_modules() -> None:
    modules = _contract_modules()
    for name in ("frames", "readers", "writers", "labels"):
        assert f"contract.{name}" in modules


def test_importing_every_contract_module_pulls_in_no_heavy_framework() -> None:
    modules = _contract_modules()
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(contract.__file__).resolve().parent.parent,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
