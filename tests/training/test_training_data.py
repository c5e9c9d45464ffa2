"""training.data: which frames a run trains and validates on, and how evaluation frames are read.

No torch here: data loading is numpy + the contract readers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.training_helpers import write_plain_folder, write_tiny_synth
from training.data import load_labelled_frames, load_training_frames


@pytest.mark.parametrize("fmt", ["dir", "tar", "parquet"])
def test_synth_folder_trains_on_its_train_split_and_validates_on_val(tmp_path: Path, fmt: str) -> None:
    folder = write_tiny_synth(tmp_path / "synth", n_train=10, n_val=4, n_test=3, fmt=fmt)
    data = load_training_frames([folder], 32)
    assert data.train.shape == (10, 32, 32, 3) and data.train.dtype == np.uint8
    assert data.val.shape == (4, 32, 32, 3)
    assert data.labels == ["normal"] * 4
    assert data.sources == [str(folder)]


def test_a_train_split_without_val_holds_out_a_seeded_share_never_trained_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_tiny_synth(tmp_path / "synth", n_train=20, n_val=0, n_test=2)
    data = load_training_frames([folder], 32, seed=3, val_fraction=0.25)
    again = load_training_frames([folder], 32, seed=3, val_fraction=0.25)
    assert (len(data.train), len(data.val)) == (15, 5)
    assert not {row.tobytes() for row in data.train} & {row.tobytes() for row in data.val}
    assert np.array_equal(data.val, again.val) and data.labels == ["normal"] * 5
    assert "no val split: 5 of its 20 train frames (seed 3) are held out" in caplog.text


def test_a_data_folder_behind_a_symbolic_link_is_read(tmp_path: Path) -> None:
    folder = write_tiny_synth(tmp_path / "disk" / "synth", n_train=6, n_val=2)
    (tmp_path / "link").symlink_to(folder)  # the folder itself is a link
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "run-1").symlink_to(folder / "train")  # a link inside a plain folder
    (tmp_path / "outer" / "loop").symlink_to(tmp_path / "outer")  # a cycle ends
    assert len(load_training_frames([tmp_path / "link"], 32).train) == 6
    linked = load_training_frames([tmp_path / "outer"], 32, val_fraction=0.5)
    assert len(linked.train) + len(linked.val) == 6


def test_frames_are_resized_to_the_requested_size(tmp_path: Path) -> None:
    folder = write_tiny_synth(tmp_path / "synth", size=40, n_train=3, n_val=2)
    data = load_training_frames([folder], 32)
    assert data.train.shape[1:] == (32, 32, 3)


def test_test_split_and_edge_cases_never_reach_training(tmp_path: Path) -> None:
    folder = write_tiny_synth(tmp_path / "synth", n_train=5, n_val=2, n_test=4)
    data = load_training_frames([folder], 32)
    test, families, _, _ = load_labelled_frames(folder, 32)
    train_rows = {row.tobytes() for row in data.train} | {row.tobytes() for row in data.val}
    assert not train_rows & {frame.tobytes() for frame in test}
    assert "fog" in families


def test_plain_folder_is_split_by_seed_deterministically(tmp_path: Path) -> None:
    folder = write_plain_folder(tmp_path / "frames", 20)
    a = load_training_frames([folder], 32, seed=1, val_fraction=0.25)
    b = load_training_frames([folder], 32, seed=1, val_fraction=0.25)
    c = load_training_frames([folder], 32, seed=2, val_fraction=0.25)
    assert (len(a.train), len(a.val)) == (15, 5)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.val, b.val)
    assert a.fingerprint != c.fingerprint  # another seed, another split
    assert a.labels is None


def test_several_sources_concatenate(tmp_path: Path) -> None:
    synth = write_tiny_synth(tmp_path / "synth", n_train=6, n_val=2)
    extra = write_plain_folder(tmp_path / "reviewed", 10, seed=5)
    data = load_training_frames([synth, extra], 32)
    assert len(data.train) == 6 + 9 and len(data.val) == 2 + 1
    assert data.labels == ["normal", "normal", "unlabelled"]


def test_max_frames_caps_what_is_read(tmp_path: Path) -> None:
    folder = write_tiny_synth(tmp_path / "synth", n_train=12, n_val=6)
    data = load_training_frames([folder], 32, max_frames=4)
    assert len(data.train) == 4 and 1 <= len(data.val) <= 4


def test_no_frames_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frames found"):
        load_training_frames([tmp_path / "empty"], 32)
    with pytest.raises(ValueError, match="not found"):
        load_training_frames([tmp_path / "missing"], 32)
    with pytest.raises(ValueError, match="no data sources"):
        load_training_frames([], 32)


def test_labelled_frames_come_from_the_test_split_with_families(tmp_path: Path) -> None:
    folder = write_tiny_synth(tmp_path / "synth", n_train=4, n_val=2, n_test=3)
    frames, families, keys, strengths = load_labelled_frames(folder, 32)
    assert frames.shape == (6, 32, 32, 3)
    assert sorted(families) == ["fog"] * 3 + ["normal"] * 3
    assert all(k.startswith("test/") for k in keys)
    assert strengths.dtype == np.float32
    assert all((s > 0) == (f == "fog") for s, f in zip(strengths, families, strict=True))
    frames, families, _, _ = load_labelled_frames(folder, 32, max_per_family=1)
    assert sorted(families) == ["fog", "normal"]


def test_labelled_frames_need_a_labels_file(tmp_path: Path) -> None:
    folder = write_plain_folder(tmp_path / "frames", 3)
    with pytest.raises(ValueError, match="labels.csv"):
        load_labelled_frames(folder, 32)


def test_plots_write_pngs_for_both_training_loops(tmp_path: Path) -> None:
    from PIL import Image

    from training.plots import image_grid, plot_losses, plot_tsne, save_image_grid

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    grid = image_grid(frames, nrow=4, pad=2)
    assert grid.shape == (3 * 10 + 2, 4 * 10 + 2, 3)
    assert np.array_equal(grid[2:10, 2:10], frames[0])  # first frame top-left, after the gutter
    save_image_grid(frames, tmp_path / "grid.png", nrow=4, scale=2)
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (2 * 42, 2 * 32)
    history = [{"epoch": e, "train_bpd": 5.0 - e, "val_bpd": 5.1 - e, "seconds": 3.0} for e in (1, 2, 3)]
    plot_losses(history, tmp_path / "loss.png")
    labels = ["normal"] * 20 + ["fog"] * 5
    plot_tsne(rng.normal(size=(25, 6)), labels, tmp_path / "tsne.png")
    for name in ("loss.png", "tsne.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size[0] > 100
    with pytest.raises(ValueError, match="uint8 NHWC"):
        image_grid(frames.astype(np.float32), nrow=4)
    with pytest.raises(ValueError, match="labels"):
        plot_tsne(rng.normal(size=(5, 2)), ["a"], tmp_path / "bad.png")


def test_repeated_loads_are_cached_copies_and_see_new_frames(tmp_path: Path) -> None:
    folder = write_plain_folder(tmp_path / "frames", 10)
    a = load_training_frames([folder], 32, seed=3)
    b = load_training_frames([folder], 32, seed=3)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.train, b.train)
    b.train[:] = 0  # a caller's copy: scribbling on it does not reach the next caller
    assert np.array_equal(load_training_frames([folder], 32, seed=3).train, a.train)
    write_plain_folder(tmp_path / "frames" / "more", 5, seed=9)  # frames added: not served stale
    assert len(load_training_frames([folder], 32, seed=3).train) > len(a.train)


@pytest.mark.parametrize(
    ("source_hw", "size"),
    [((72, 128), "64"), ((96, 128), "64"), ((96, 96), "64"), ((72, 128), "256x144"), ((96, 128), "48x32")],
)
def test_training_frames_keep_the_whole_frame_by_the_one_resize_rule(
    tmp_path: Path, source_hw: tuple[int, int], size: str
) -> None:
    """16:9, 4:3 and square sources at square and wide model sizes: the trainer's arrays are exactly
    contract's fit-pad rule (nothing cropped away, black bars where the aspects differ)."""
    from contract.frames import RESIZE_RULE, encode_png, frame_size, resize_frame

    h, w = source_hw
    frame = np.zeros((h, w, 3), dtype=np.uint8)
    frame[:, :4] = (255, 0, 0)  # left and right edges marked: a centre crop would cut them away
    frame[:, -4:] = (0, 0, 255)
    frame[:, 4:-4] = (90, 140, 220)
    folder = tmp_path / "cam"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.png").write_bytes(encode_png(frame))
    data = load_training_frames([folder], size)
    target = frame_size(size)
    assert data.train.shape[1:] == (target.height, target.width, 3)
    np.testing.assert_array_equal(data.train[0], resize_frame(frame, target, RESIZE_RULE))
    row = data.train[0][target.height // 2].astype(int)
    content = np.flatnonzero(row.sum(axis=1) > 0)  # pillarbox bars are black
    left, right = row[content[0]], row[content[-1]]
    assert left[0] > left[2] and right[2] > right[0]  # both edges of the camera frame are still there
