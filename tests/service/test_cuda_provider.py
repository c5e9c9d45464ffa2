"""On a GPU machine, the service's CUDA session scores as its CPU session does (same exported graph).

Marked ``gpu``: skipped where onnxruntime has no CUDA provider (conftest says why), run as is on a
machine with `pip install '.[gpu]'`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from service_helpers import publish_model

from service.registry import ModelRegistry

pytestmark = pytest.mark.gpu


def test_the_cuda_session_really_runs_on_cuda_and_matches_cpu(tmp_path: Path) -> None:
    publish_model(tmp_path, "bright", 1, size=16, threshold=0.5)
    cpu = ModelRegistry(tmp_path, providers=["CPUExecutionProvider"]).load("bright")
    gpu = ModelRegistry(tmp_path, providers=["CUDAExecutionProvider"]).load("bright")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    frames = np.random.default_rng(0).integers(0, 256, (37, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(gpu.score(frames)["score"], cpu.score(frames)["score"], rtol=1e-5, atol=1e-6)
