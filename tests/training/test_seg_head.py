"""The DRAEM-style head ``<kind>-seg``: synthetic defects, a net that learns to find them, its cache,
its export, and the held-out corruptions that judge it (training/heads/seg.py, training/seg_net.py,
training/protocol.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from eval_helpers import normal_frames, write_labelled_folder, write_tiny_gan_run  # noqa: E402
from training_helpers import assert_parity  # noqa: E402

from training.heads import HeadUnavailable, available_heads, build_score_graph  # noqa: E402
from training.heads.seg import SegGraph, load_reconstructor, resolve_steps  # noqa: E402
from training.protocol import heldout_anomalies, pseudo_auroc  # noqa: E402
from training.runs import load_config, save_config  # noqa: E402
from training.seg_net import (  # noqa: E402
    SegNet,
    perlin_mask,
    pseudo_anomalies,
    random_windows,
    train_seg_net,
    window_positions,
    windows_per_frame,
    with_coords,
)


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    data = write_labelled_folder(root / "data")
    return write_tiny_gan_run(root / "run", data)


def test_perlin_masks_are_binary_and_range_from_a_few_pixels_to_much_of_the_window() -> None:
    rng = np.random.default_rng(0)
    masks = [perlin_mask(rng, 64, 64) for _ in range(300)]
    assert all(m.dtype == np.bool_ and m.shape == (64, 64) for m in masks)
    areas = np.array([m.sum() for m in masks])
    assert areas.min() >= 1  # never empty: an empty draw becomes the noise's peak
    assert (areas <= 10).sum() >= 15  # some defects are a few pixels, like a distant pedestrian
    assert np.median(areas) < 64 * 64 / 10
    assert areas.max() > 64 * 64 / 4  # and some cover a large part of the window


def test_pseudo_anomalies_mark_exactly_the_pixels_they_changed_inside_their_windows() -> None:
    frames = normal_frames(64, size=96, seed=1)
    rng = np.random.default_rng(3)
    windows = window_positions(96, 96, 64, rng, 32, per_frame=2)
    out, masks = pseudo_anomalies(frames, normal_frames(8, size=96, seed=2), rng, windows)
    changed = (out != frames).any(-1)
    np.testing.assert_array_equal(changed, masks.astype(bool))
    clean = 0
    for mask, frame_windows in zip(masks, windows, strict=True):
        inside = np.zeros_like(mask, dtype=bool)
        for top, left, h, w in frame_windows:
            inside[top : top + h, left : left + w] = True
            clean += int(mask[top : top + h, left : left + w].sum() == 0)
        assert not (mask.astype(bool) & ~inside).any()  # defects lie in the windows the net will see
    assert 32 <= clean <= 96  # about half of the windows stay clean, as normal examples


def test_a_window_knows_where_it_sits_in_the_full_frame() -> None:
    frames = torch.zeros(2, 6, 144, 256)  # the same (blank) pixels everywhere
    inputs = with_coords(frames)
    assert inputs.shape == (2, 8, 144, 256)
    target = torch.zeros(2, 1, 144, 256)
    windows = [[(0, 0, 64, 64)], [(80, 192, 64, 64)]]  # top left and bottom right
    crops, _ = random_windows(inputs, target, np.random.default_rng(0), 64, windows)
    torch.testing.assert_close(crops[0, :6], crops[1, :6])  # same pixels...
    assert (crops[0, 6:] - crops[1, 6:]).abs().min() > 0.5  # ...at two places: different inputs
    assert float(crops[0, 6].min()) == pytest.approx(-1 + 1 / 144)  # row plane of the full frame
    assert float(crops[1, 7].max()) == pytest.approx(1 - 1 / 256)  # column plane of the full frame
    net = SegNet().eval()
    with torch.no_grad():
        out = net(crops)
    assert not torch.allclose(out[0], out[1])  # so the net can answer differently at each place


def test_heldout_corruptions_change_every_frame_locally_or_globally() -> None:
    frames = normal_frames(60, seed=4)
    out = heldout_anomalies(frames)
    changed = (out != frames).any(-1).mean(axis=(1, 2))
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert (changed > 0).mean() > 0.9
    assert (changed < 0.2).sum() > 20 and (changed > 0.8).sum() > 10  # local and global kinds both occur


def test_the_seg_net_learns_to_find_defects_it_was_trained_on(gan_run: Path) -> None:
    frames = normal_frames(64, seed=5)
    reconstructor = load_reconstructor(gan_run, "gan")
    net, losses = train_seg_net(reconstructor, frames, steps=160, seed=0)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    graph = SegGraph(reconstructor, net, (32, 32)).eval()
    test = normal_frames(80, seed=6)
    corrupted, masks = pseudo_anomalies(test, frames, np.random.default_rng(7))
    with torch.no_grad():
        score, amap = graph(torch.from_numpy(corrupted))
    assert amap.shape == (80, 32, 32)
    area = masks.sum(axis=(1, 2))
    # judged on clean frames against defects of at least 16 px: a 2 px blend of road texture into
    # road is a defect only on paper, on these smooth test frames
    judged = (area == 0) | (area >= 16)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(area[judged] > 0, score.numpy()[judged]) > 0.75


def test_run_seg_head_trains_once_then_loads_from_its_cache(
    gan_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_score_graph(gan_run, "gan-seg")
    cache = gan_run / "banks" / "seg.pt"
    assert cache.is_file()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached seg net was retrained")

    monkeypatch.setattr("training.heads.seg.train_seg_net", no_training)
    second = build_score_graph(gan_run, "gan-seg")
    frames = torch.from_numpy(normal_frames(4, seed=11))
    with torch.no_grad():
        torch.testing.assert_close(first(frames)[0], second(frames)[0])


def test_seg_head_exports_and_matches_onnxruntime(gan_run: Path, tmp_path: Path) -> None:
    graph = build_score_graph(gan_run, "gan-seg")
    names = assert_parity(graph, normal_frames(5, seed=12), tmp_path / "seg.onnx")
    assert names == ["score", "anomaly_map"]


def test_a_run_trained_without_a_seg_head_says_so_and_its_combo_does_without(
    tmp_path: Path,
) -> None:
    data = write_labelled_folder(tmp_path / "data")
    run = write_tiny_gan_run(tmp_path / "run", data)
    save_config(run, {**load_config(run), "seg_steps": 0})
    assert "gan-seg" not in available_heads(run)  # so evaluate and calibrate skip it
    with pytest.raises(HeadUnavailable, match="--seg-steps 0"):
        build_score_graph(run, "gan-seg")
    build_score_graph(run, "gan-combo")
    record = json.loads((run / "banks" / "gan-combo.json").read_text())
    assert "gan-seg" not in record["components"] and "gan-patch" in record["components"]


def test_large_frames_train_on_aligned_random_windows() -> None:
    inputs = torch.arange(2 * 6 * 128 * 128, dtype=torch.float32).reshape(2, 6, 128, 128)
    target = inputs[:, :1].clone()  # the mask must be cut from the same place as the frame
    windows, masks = random_windows(inputs, target, np.random.default_rng(0), 64)
    assert windows.shape == (2, 6, 64, 64) and masks.shape == (2, 1, 64, 64)
    wide, _ = random_windows(inputs[..., :96], target[..., :96], np.random.default_rng(0), 64)
    assert wide.shape == (2, 6, 64, 64)  # one side above the window is enough to cut windows
    torch.testing.assert_close(masks, windows[:, :1])
    small = inputs[:, :, :64, :64]
    same, _ = random_windows(small, target[:, :, :64, :64], np.random.default_rng(0), 64)
    assert same is small  # 64 px frames train whole


def test_a_wide_frame_gives_several_windows_per_reconstruction() -> None:
    assert windows_per_frame(64, 64) == 1  # 64x64 trains as before: one whole frame per window
    assert windows_per_frame(144, 256) == 4
    inputs = torch.zeros(2, 8, 144, 256)
    windows = window_positions(144, 256, 2, np.random.default_rng(0), 64, per_frame=4)
    crops, masks = random_windows(inputs, inputs[:, :1], np.random.default_rng(0), 64, windows)
    assert crops.shape == (8, 8, 64, 64) and masks.shape == (8, 1, 64, 64)


def test_training_steps_follow_the_run_config() -> None:
    assert resolve_steps({}, 4000) == 2400
    assert resolve_steps({"seg_steps": 0}, 4000) == 0
    assert resolve_steps({"dry_run": True}, 4000) == 2
    assert resolve_steps({"seg_steps": 800}, 16) == 13  # at most 25 passes over a tiny run's frames


def test_the_heldout_protocol_is_a_separate_choice(gan_run: Path) -> None:
    val = normal_frames(24, seed=13)
    graph = build_score_graph(gan_run, "gan-seg")
    for corruptions in ("patches", "heldout", "all"):
        assert 0.0 <= pseudo_auroc(graph, val, corruptions=corruptions) <= 1.0
    with pytest.raises(ValueError, match="valid: patches, heldout, all"):
        pseudo_auroc(graph, val, corruptions="fog")


def test_both_trainers_default_to_the_size_budgets_seg_step_count() -> None:
    from training.budgets import size_budgets
    from training.gan_train import GANConfig
    from training.seg_net import STEPS
    from training.vae_train import VAEConfig

    assert VAEConfig().size == GANConfig().size == "256x144"
    assert VAEConfig().seg_steps == GANConfig().seg_steps == size_budgets("vae", "256x144")["seg_steps"]
    assert size_budgets("gan", 64)["seg_steps"] == STEPS  # 64x64 keeps the protocol's step count
