"""Training at a non-square H x W (issue 12): a tiny VAE run and a tiny GAN run at 48x32 (W x H) from
3:2 frames read by the fit-pad rule; every head of both runs and of their ensemble scores [N, H, W, 3]
uint8 with a full-resolution map [N, H, W], and exports with the export's own parity rule. One head
goes through ``export_run`` so the manifest's input height, width and resize rule are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from eval_helpers import write_groups  # noqa: E402
from training_helpers import assert_parity  # noqa: E402

from contract.frames import RESIZE_RULE  # noqa: E402

# torch >= 2.9 flags the TorchScript exporter (dynamo=False) as deprecated; export chooses it on purpose
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

H, W = 32, 48
SIZE = f"{W}x{H}"


def wide_frames(n: int, seed: int, *, object_px: int = 0) -> npt.NDArray[np.uint8]:
    """96x64 (3:2) road frames: sky over road, a horizon that moves a little; optional magenta box."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, 64, 96, 3), dtype=np.uint8)
    for i in range(n):
        horizon = 30 + int(rng.integers(-3, 4))
        img = np.zeros((64, 96, 3), dtype=np.float32)
        img[:horizon] = (90, 140, 220)
        img[horizon:] = (95, 95, 100)
        img += rng.normal(0, 6, img.shape)
        if object_px:
            y, x = int(rng.integers(horizon + 2, 64 - object_px)), int(rng.integers(0, 96 - object_px))
            img[y : y + object_px, x : x + object_px] = (255, 0, 255)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def write_wide_folder(root: Path) -> Path:
    groups = [
        ("train", "normal", wide_frames(40, 1)),
        ("val", "normal", wide_frames(12, 2)),
        ("test", "normal", wide_frames(8, 3)),
        ("test", "blob", wide_frames(8, 4, object_px=8)),
    ]
    return write_groups(root, groups)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from training.ensemble import create_ensemble
    from training.gan_train import GANConfig, train_gan
    from training.vae_train import VAEConfig, train_vae

    root = tmp_path_factory.mktemp("wide")
    data = [str(write_wide_folder(root / "data"))]
    common = {"size": SIZE, "latent_dim": 8, "batch_size": 8, "device": "cpu", "seg_steps": 3}
    vae = train_vae(VAEConfig(**common, width=4, epochs=1), data, root / "vae")
    gan = train_gan(
        GANConfig(**common, width=4, epochs=1, encoder_epochs=1, bank_size=16, max_frames=None),
        data,
        root / "gan",
    )
    return {"vae": vae, "gan": gan, "ensemble": create_ensemble([vae, gan], root / "ensemble")}


def test_runs_record_the_size_as_w_x_h_and_the_networks_take_it(runs: dict[str, Path]) -> None:
    from training.heads.gan import load_gan
    from training.heads.vae import load_vae

    for kind in ("vae", "gan"):
        config = json.loads((runs[kind] / "config.json").read_text())
        assert (config["size"], config["resize_rule"]) == (SIZE, RESIZE_RULE)
    vae, _ = load_vae(runs["vae"])
    assert vae.bottom == (4, 6)  # 3 stride-2 stages: 32x48 -> 4x6
    gan, _ = load_gan(runs["gan"])
    with torch.no_grad():
        assert gan.generator(torch.zeros(2, 8)).shape == (2, 3, H, W)
        assert gan.discriminator(torch.zeros(2, 3, H, W)).shape == (2,)


def test_every_head_scores_full_resolution_maps_and_exports(runs: dict[str, Path], tmp_path: Path) -> None:
    from training.heads import available_heads, build_score_graph, head_info

    frames = wide_frames(5, 9, object_px=6)[:, ::2, ::2].copy()  # what the reader makes of 96x64
    seen = []
    for run in runs.values():
        for head in available_heads(run):
            graph = build_score_graph(run, head)
            with torch.no_grad():
                out = graph(torch.from_numpy(frames))
            score, amap = out if isinstance(out, tuple) else (out, None)
            assert score.shape == (5,), head
            if head_info(head).has_map:
                assert amap is not None and amap.shape == (5, H, W), head
            names = assert_parity(graph, frames, tmp_path / f"{head}.onnx")
            assert names[0] == "score"
            seen.append(head)
    assert {
        "vae-seg",
        "vae-patch",
        "vae-combo",
        "gan-seg",
        "gan-patch",
        "gan-combo",
        "ensemble-combo",
    } <= set(seen)


def test_export_writes_the_runs_height_width_and_resize_rule(runs: dict[str, Path], tmp_path: Path) -> None:
    from contract.manifest import load_manifest
    from training.export import export_run

    version = export_run(runs["gan"], "gan-patch", tmp_path / "models")
    manifest = load_manifest(version)
    assert (manifest.input.height, manifest.input.width) == (H, W)
    assert manifest.input.resize_rule == RESIZE_RULE
    assert [o.shape for o in manifest.outputs] == [["N"], ["N", H, W]]
