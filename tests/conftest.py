"""Shared pytest setup for every test folder.

Tests live in folders that mirror the layout (contract/, training/, service/, deploy/, e2e/). This
file sits at the top so that, with pytest's default prepend import mode, ``tests/`` is on sys.path
and the helper modules beside it (``service_helpers``, ``training_helpers``, ``eval_helpers``) import
the same way from every folder. Test file names stay unique across folders for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TinyRun = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_run() -> TinyRun:
    """The one tiny-model factory: ``tiny_run(kind, root, seg_steps=None) -> RUN_DIR``.

    An untrained but complete run (config.json, model.pt; a GAN run also its D-feature bank) of a
    width-4 network on 32 px frames, over a small labelled folder written beside it (``root/data``
    unless ``data`` is given). ``seg_steps=0`` gives a run without a seg head (no U-Net to train).
    """
    from eval_helpers import write_labelled_folder, write_tiny_gan_run, write_tiny_vae_run

    def make(kind: str, root: Path, *, data: Path | None = None, seg_steps: int | None = None) -> Path:
        if kind not in ("vae", "gan"):
            raise ValueError(f"tiny runs are 'vae' or 'gan', not {kind!r}")
        data = data or (root / "data" if (root / "data").is_dir() else write_labelled_folder(root / "data"))
        write = write_tiny_vae_run if kind == "vae" else write_tiny_gan_run
        run = write(root / kind, data)
        if seg_steps is not None:
            from training.runs import load_config, save_config

            save_config(run, {**load_config(run), "seg_steps": seg_steps})
        return run

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run only where onnxruntime has CUDA; elsewhere they are skipped, saying why."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs onnxruntime with CUDA (pip install '.[gpu]' on a GPU machine)")
    for item in gpu_items:
        item.add_marker(skip)
