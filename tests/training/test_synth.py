"""The synthetic frame generator: deterministic, any size 32..256, labelled families that differ.

No torch here: training.synth is numpy only.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from training.synth import FAMILIES, NORMAL, render_batch, write_dataset
from training.synth.dataset import frame_key, resolve_families

SUBTLE = ("pedestrian", "animal", "construction")


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: P(positive scores above negative), ties counted half."""
    neg, pos = np.asarray(negatives, float), np.asarray(positives, float)
    scores = np.concatenate([neg, pos])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (Mann-Whitney U).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    u = ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def test_auroc_helper_matches_known_values() -> None:
    assert auroc(np.array([0, 1]), np.array([2, 3])) == 1.0
    assert auroc(np.array([2, 3]), np.array([0, 1])) == 0.0
    assert auroc(np.array([1, 1]), np.array([1, 1])) == 0.5
    assert auroc(np.array([0, 2]), np.array([1, 3])) == 0.75


def test_library_imports_without_torch() -> None:
    import subprocess

    code = "import sys, training.synth; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_same_seed_gives_identical_bytes_and_another_seed_differs() -> None:
    a, sa = render_batch(7, 6, 64, "fog")
    b, sb = render_batch(7, 6, 64, "fog")
    c, _ = render_batch(8, 6, 64, "fog")
    assert a.tobytes() == b.tobytes() and np.array_equal(sa, sb)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("family", (NORMAL, *FAMILIES))
def test_a_frame_does_not_depend_on_how_many_are_rendered_with_it(family: str) -> None:
    many, strengths = render_batch(3, 9, 48, family)
    few, first = render_batch(3, 2, 48, family)
    assert np.array_equal(many[:2], few) and np.array_equal(strengths[:2], first)


def test_a_generator_seed_is_deterministic_too() -> None:
    a, _ = render_batch(np.random.default_rng(5), 4, 32)
    b, _ = render_batch(np.random.default_rng(5), 4, 32)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_frames_are_uint8_nhwc_at_the_requested_size(size: int) -> None:
    frames, strengths = render_batch(0, 3, size, "rain")
    assert frames.shape == (3, size, size, 3) and frames.dtype == np.uint8
    assert strengths.shape == (3,) and strengths.dtype == np.float32
    assert frames.std() > 10  # a scene, not a flat fill


def test_the_largest_size_renders() -> None:
    frames, _ = render_batch(0, 2, 256, "pedestrian", strength=1.0)
    assert frames.shape == (2, 256, 256, 3)


@pytest.mark.parametrize("bad", [31, 257, 0])
def test_sizes_outside_32_to_256_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="size"):
        render_batch(0, 1, bad)


def test_unknown_family_and_bad_strength_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown family 'hail'.*night"):
        render_batch(0, 1, 64, "hail")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        render_batch(0, 1, 64, "fog", strength=1.5)
    with pytest.raises(ValueError, match="normal frames have strength 0"):
        render_batch(0, 1, 64, NORMAL, strength=0.5)


def test_strengths_are_drawn_in_the_test_range_or_taken_as_given() -> None:
    _, drawn = render_batch(0, 50, 32, "snow")
    assert drawn.min() >= 0.3 and drawn.max() <= 1.0 and drawn.std() > 0.1
    _, given = render_batch(0, 3, 32, "snow", strength=[0.0, 0.5, 1.0])
    assert given.tolist() == [0.0, 0.5, 1.0]
    _, normal = render_batch(0, 3, 32)
    assert not normal.any()


def test_normal_frames_vary() -> None:
    frames, _ = render_batch(0, 64, 64)
    brightness = frames.reshape(64, -1).mean(axis=1)
    assert brightness.std() > 4  # sky, exposure, weather-free variation
    sky_colour = frames[:, 2:6].reshape(64, -1, 3).mean(axis=1)
    assert (sky_colour[:, 2] > sky_colour[:, 0]).mean() > 0.9  # clear (blue) skies
    assert len({f.tobytes() for f in frames}) == 64


def test_families_are_unique_and_named_as_documented() -> None:
    assert FAMILIES == (
        "night", "fog", "rain", "snow", "pedestrian", "animal", "sharp_curve",
        "construction", "glare", "lens_dirt", "sensor_fault",
    )  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_changes_the_same_scene(family: str) -> None:
    """Same seed stream, same base scene: the family's effect is what differs."""
    from training.synth.draws import frame_generators
    from training.synth.families import FAMILY_BY_NAME
    from training.synth.render import render_with_generators

    gens_a = frame_generators(11, (5, 0), range(8))
    gens_b = frame_generators(11, (5, 0), range(8))
    normal, _ = render_with_generators(gens_a, 64, None)
    edge, _ = render_with_generators(gens_b, 64, FAMILY_BY_NAME[family], np.full(8, 1.0, np.float32))
    changed = (np.abs(edge.astype(int) - normal.astype(int)).max(axis=3) > 24).mean(axis=(1, 2))
    assert (changed > 0.002).all(), f"{family} left some frames (almost) unchanged: {changed}"


def test_weather_families_move_brightness_the_expected_way() -> None:
    normal, _ = render_batch(1, 40, 48)
    night, _ = render_batch(1, 40, 48, "night")
    fog, _ = render_batch(1, 40, 48, "fog", strength=1.0)
    assert night.mean() < 0.6 * normal.mean()
    assert fog.std(axis=(1, 2, 3)).mean() < 0.6 * normal.std(axis=(1, 2, 3)).mean()  # contrast loss


@pytest.mark.parametrize("family", SUBTLE)
def test_subtle_families_are_not_findable_by_mean_brightness(family: str) -> None:
    """AUROC of a brightness-only score (either direction, or distance to the normal median) < 0.9."""
    normal, _ = render_batch(100, 300, 64)
    edge, _ = render_batch(101, 300, 64, family)
    b_normal = normal.reshape(len(normal), -1).mean(axis=1)
    b_edge = edge.reshape(len(edge), -1).mean(axis=1)
    median = np.median(b_normal)
    scores = [
        auroc(b_normal, b_edge),
        auroc(-b_normal, -b_edge),
        auroc(np.abs(b_normal - median), np.abs(b_edge - median)),
    ]
    assert max(scores) < 0.9, scores


def test_subtle_objects_are_small() -> None:
    """Pedestrians are a few to ~20 pixels tall at 64x64: find the changed rows per frame."""
    from training.synth.draws import frame_generators
    from training.synth.families import FAMILY_BY_NAME
    from training.synth.render import render_with_generators

    heights = []
    for strength in (0.3, 1.0):
        gens_a, gens_b = frame_generators(4, (6, 0), range(12)), frame_generators(4, (6, 0), range(12))
        normal, _ = render_with_generators(gens_a, 64, None)
        person, _ = render_with_generators(
            gens_b, 64, FAMILY_BY_NAME["pedestrian"], np.full(12, strength, np.float32)
        )
        diff = np.abs(person.astype(int) - normal.astype(int)).max(axis=3) > 30
        rows = [np.nonzero(d.any(axis=1))[0] for d in diff]
        heights.append(np.median([r.max() - r.min() + 1 for r in rows if len(r)]))
    assert 1 <= heights[0] <= 8 and 8 <= heights[1] <= 24, heights


def read_labels(out: Path) -> list[dict[str, str]]:
    with open(out / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_dataset_dir_writes_splits_labels_config_and_contact_sheet(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    summary = write_dataset(out, 32, 12, "fog,pedestrian", 3, "dir", 4, 5, 3, progress=False)
    rows = read_labels(out)
    assert list(rows[0]) == ["key", "path", "split", "family", "strength", "distance_m"]
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        counts[row["split"], row["family"]] = counts.get((row["split"], row["family"]), 0) + 1
        assert (out / row["path"]).is_file()
        assert row["key"].startswith(f"{row['split']}/{row['family']}/{row['family']}_")
        assert row["path"] == row["key"] + ".png"
        strength = float(row["strength"])
        assert strength == 0 if row["family"] == NORMAL else 0.3 <= strength <= 1.0
        assert row["distance_m"] == ""  # square frames size objects in pixels, not metres
    assert counts == {
        ("train", NORMAL): 12,
        ("val", NORMAL): 4,
        ("test", NORMAL): 5,
        ("test", "fog"): 3,
        ("test", "pedestrian"): 3,
    }
    config = json.loads((out / "synth.json").read_text())
    assert config["families"] == ["fog", "pedestrian"] and config["seed"] == 3 and config["size"] == 32
    assert (out / "contact_sheet.png").stat().st_size > 1000
    assert summary["frames"] == 27 and summary["frames_per_s"] > 0
    assert frame_key("test", "fog", 12) == "test/fog/fog_000012"


def test_write_dataset_is_byte_identical_across_runs(tmp_path: Path) -> None:
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        write_dataset(out, 32, 6, "night", 1, "tar", 2, 2, 2, progress=False)
        digests.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert digests[0] == digests[1]


def test_write_dataset_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    write_dataset(out, 32, 2, (), 0, "tar", 0, 0, 0, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_dataset(out, 32, 2, (), 0, "tar", 0, 0, 0, progress=False)
    write_dataset(out, 32, 3, (), 0, "dir", 0, 0, 0, progress=False, overwrite=True)
    assert not list(out.glob("*.tar"))  # earlier shards went
    assert (out / "notes.txt").read_text() == "mine"  # the user's file stayed
    assert len(read_labels(out)) == 3


def test_family_lists_resolve_in_canonical_order() -> None:
    assert resolve_families("all") == FAMILIES
    assert resolve_families("snow, night") == ("night", "snow")
    with pytest.raises(ValueError, match="unknown families hail; valid: all, night"):
        resolve_families("night,hail")


def test_an_empty_family_list_is_refused() -> None:
    with pytest.raises(ValueError, match="no families given"):
        resolve_families(" , ")


def test_contact_sheet_has_a_labelled_row_per_family_normal_first(tmp_path: Path) -> None:
    from PIL import Image

    from training.synth import write_contact_sheet
    from training.synth.contact_sheet import HEADER_H, LABEL_W, PAD, PER_ROW

    path = write_contact_sheet(tmp_path / "sheet.png", 32, 0, ("glare", "fog"))
    image = np.asarray(Image.open(path).convert("RGB"))
    cell = 128  # 32 px frames are upscaled 4x so a person can see them
    assert image.shape == (HEADER_H + 3 * (cell + PAD) + PAD, LABEL_W + PER_ROW * (cell + PAD) + PAD, 3)
    label_column = image[HEADER_H:, :LABEL_W].max(axis=2)
    rows_with_text = [(label_column[r * (cell + PAD) : (r + 1) * (cell + PAD)] > 150).any() for r in range(3)]
    assert all(rows_with_text)
