"""`edgecase synth` as a user runs it: a subprocess per call, small counts, all three formats."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

# The installed console script, as a user runs it (the venv's bin/ holds it beside python).
EDGECASE = [str(Path(sys.executable).with_name("edgecase"))]
SMALL = ["--size", "32", "--n-normal", "20", "--n-val", "4", "--n-test-normal", "4", "--n-per-family", "2"]


def synth(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGECASE, "synth", *args], capture_output=True, text=True, timeout=300)


def labels(out: Path) -> list[dict[str, str]]:
    with open(out / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("fmt", ["dir", "tar", "parquet"])
def test_synth_writes_every_format_with_labels_config_and_contact_sheet(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "synth"
    result = synth("--out", str(out), *SMALL, "--format", fmt, "--families", "all", "--seed", "1")
    assert result.returncode == 0, result.stderr
    rows = labels(out)
    assert len(rows) == 20 + 4 + 4 + 11 * 2
    assert {r["family"] for r in rows if r["split"] == "test"} >= {"normal", "fog", "sensor_fault"}
    assert {r["split"] for r in rows if r["family"] != "normal"} == {"test"}
    assert (out / "contact_sheet.png").stat().st_size > 1000
    config = json.loads((out / "synth.json").read_text())
    assert config["format"] == fmt and config["n_normal"] == 20 and len(config["families"]) == 11
    assert "contact sheet:" in result.stdout and "frames/s" in result.stdout
    if fmt == "dir":
        assert all((out / r["path"]).is_file() and r["path"] == r["key"] + ".png" for r in rows)
    elif fmt == "tar":
        assert {r["path"] for r in rows} == {"train-00000.tar", "val-00000.tar", "test-00000.tar"}
        with tarfile.open(out / "test-00000.tar") as tar:
            names = tar.getnames()
        assert "test/fog/fog_000001.png" in names and "test/fog/fog_000001.json" in names
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out / "train-00000.parquet")
        assert table.column_names[:2] == ["key", "image"]
        assert {"family", "split", "strength"} <= set(table.column_names)
        assert table.num_rows == 20


def test_a_family_subset_writes_only_those_families(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = synth("--out", str(out), *SMALL, "--families", "fog,night", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert {r["family"] for r in labels(out)} == {"normal", "fog", "night"}


def test_an_unknown_family_is_a_clear_error_with_exit_code_2(tmp_path: Path) -> None:
    result = synth("--out", str(tmp_path / "x"), *SMALL, "--families", "fog,hail")
    assert result.returncode == 2
    assert "unknown families hail" in result.stderr and "sensor_fault" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_non_empty_out_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    result = synth("--out", str(out), *SMALL, "--families", "fog")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    result = synth("--out", str(out), *SMALL, "--families", "fog", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / "old.txt").read_text() == "keep"


COUNTS = ["--n-normal", "3", "--n-val", "1", "--n-test-normal", "1", "--n-per-family", "3"]
OBJECTS = ("pedestrian", "animal", "construction")


def png_shape(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return (image.height, image.width)


def test_the_default_size_is_256x144_and_objects_stand_in_the_distance_range(tmp_path: Path) -> None:
    out = tmp_path / "wide"
    result = synth("--out", str(out), *COUNTS, "--object-distance", "25-80", "--seed", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "256x144" in result.stdout and "25-80 m" in result.stdout
    rows = labels(out)
    assert all(png_shape(out / row["path"]) == (144, 256) for row in rows)
    for row in rows:
        if row["family"] in OBJECTS:
            assert 25.0 <= float(row["distance_m"]) <= 80.0
        else:
            assert row["distance_m"] == ""
    config = json.loads((out / "synth.json").read_text())
    assert (config["size"], config["height"], config["width"]) == ("256x144", 144, 256)
    assert config["object_distance_m"] == [25.0, 80.0] and config["object_size_rule"] == "pinhole"
    assert config["camera"]["hfov_deg"] == 60.0


def test_a_single_number_still_means_a_square_frame(tmp_path: Path) -> None:
    out = tmp_path / "square"
    result = synth("--out", str(out), "--size", "64", *COUNTS, "--families", "pedestrian", "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = labels(out)
    assert all(png_shape(out / row["path"]) == (64, 64) for row in rows)
    config = json.loads((out / "synth.json").read_text())
    assert (config["size"], config["height"], config["width"]) == (64, 64, 64)
    assert config["object_size_rule"] == "pixels-at-64" and config["camera"] is None


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("16", "--size of a square frame must be from 32 to 256"),
        ("16x9", "--size sides must be from 32 to 4096"),
        ("wide", "--size must be N or WxH (e.g. 64 or 256x144)"),
        ("0x144", "--size must be positive"),
    ],
)
def test_bad_size_is_refused(tmp_path: Path, size: str, message: str) -> None:
    result = synth("--out", str(tmp_path / "x"), "--size", size)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("distance", ["60-15", "2-40", "far"])
def test_bad_object_distance_is_refused(tmp_path: Path, distance: str) -> None:
    result = synth("--out", str(tmp_path / "x"), f"--object-distance={distance}")
    assert result.returncode == 2 and "--object-distance must" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_exactly_the_library_families() -> None:
    from edgecase.commands.synth import FAMILY_NAMES
    from training.synth import FAMILIES

    assert tuple(FAMILY_NAMES.split(", ")) == FAMILIES
