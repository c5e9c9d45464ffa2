"""Batch scoring without a server: every readable frame gets a row, bad frames are counted, edge cases kept.

The model is the tests' brightness graph (score = mean brightness in [0, 1], threshold 0.5), so the
expected score of a solid grey frame is known exactly.
"""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from service_helpers import publish_model

from contract.writers import open_writer
from edgecase.cli import main
from service.batch_scoring import score_dataset
from service.flagged import FlaggedStore
from service.registry import ModelRegistry


def solid(value: int, height: int = 8, width: int = 8) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


@pytest.fixture
def model(tmp_path: Path):
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    return ModelRegistry(repo).load("bright")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Three formats in one folder: loose PNGs (other sizes), a tar shard with a corrupt frame, Parquet."""
    root = tmp_path / "data"
    with open_writer(root / "loose", "dir", "test") as writer:
        writer.write("cam/dark", solid(20, 16, 24), {})  # non-square, resized by the manifest's rule
        writer.write("cam/bright", solid(240, 32, 32), {})
    with open_writer(root, "tar", "test") as writer:
        for i, value in enumerate([10, 200, 250]):
            writer.write(f"test/x/x_{i:06d}", solid(value), {"family": "x", "strength": 0.5})
    with tarfile.open(root / "test-00009.tar", "w") as tar:  # a shard holding one corrupt frame
        blob = b"\x89PNG\r\n\x1a\nnot really a png"
        info = tarfile.TarInfo("test/bad/bad_000000.png")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with open_writer(root, "parquet", "val") as writer:
        for i, value in enumerate([100, 180]):
            writer.write(f"val/normal/normal_{i:06d}", solid(value), {"family": "normal"})
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["key"]: row for row in csv.DictReader(handle)}


def test_every_readable_frame_gets_a_row_and_bad_frames_are_counted(
    model, data: Path, tmp_path: Path
) -> None:
    summary = score_dataset(model, data, tmp_path / "out" / "scores.csv", batch_size=3, progress=False)
    rows = read_csv(tmp_path / "out" / "scores.csv")
    expected = {
        "loose/cam/dark": 20,
        "loose/cam/bright": 240,
        "test/x/x_000000": 10,
        "test/x/x_000001": 200,
        "test/x/x_000002": 250,
        "val/normal/normal_000000": 100,
        "val/normal/normal_000001": 180,
    }
    assert set(rows) == set(expected)
    for key, value in expected.items():
        row = rows[key]
        assert float(row["score"]) == pytest.approx(value / 255, abs=1e-6)
        assert (row["is_edge_case"] == "True") == (value / 255 > 0.5)
        assert float(row["p_value"]) == pytest.approx(
            float(model.manifest.p_values([float(row["score"])])[0])
        )
    assert rows["test/x/x_000001"]["source"].endswith("test-00000.tar")
    assert (summary.frames, summary.edge_cases, summary.failed) == (7, 4, 1)
    ((source, key, reason),) = summary.errors
    assert source.endswith("test-00009.tar") and key == "test/bad/bad_000000" and reason
    assert "7 frames" in summary.text() and "4 flagged" in summary.text() and "1 failed" in summary.text()


def test_parquet_output_has_the_same_columns(model, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    score_dataset(model, [data / "loose"], out, progress=False)
    table = pq.read_table(out)
    assert table.column_names == ["key", "source", "score", "p_value", "is_edge_case"]
    assert table.num_rows == 2
    assert table.column("is_edge_case").to_pylist() == [True, False]  # bright, then dark (sorted keys)


def test_edge_cases_go_into_the_flagged_store(model, data: Path, tmp_path: Path) -> None:
    with FlaggedStore(tmp_path / "flagged") as store:
        summary = score_dataset(model, data, tmp_path / "s.csv", store=store, progress=False)
        records, total = store.list(newest_first=False)
    assert total == summary.edge_cases == summary.stored == 4
    assert {r.key for r in records} == {
        "loose/cam/bright",
        "test/x/x_000001",
        "test/x/x_000002",
        "val/normal/normal_000001",
    }
    assert all(r.model == "bright" and r.version == 1 and r.score > 0.5 for r in records)
    shard_flag = next(r for r in records if r.key == "test/x/x_000001")
    assert shard_flag.metadata["source"].endswith("test-00000.tar") and shard_flag.metadata["family"] == "x"


def test_a_failed_run_leaves_no_output_file(model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        score_dataset(model, tmp_path, tmp_path / "scores.txt", progress=False)
    with pytest.raises(FileNotFoundError):
        score_dataset(model, tmp_path / "missing", tmp_path / "scores.csv", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_the_score_command_end_to_end(model, data: Path, tmp_path: Path, capsys) -> None:
    repo, out, store = tmp_path / "models", tmp_path / "scores.csv", tmp_path / "flagged"
    argv = ["score", "--repo", str(repo), "--model", "bright", "--data", str(data), "--out", str(out)]
    assert main([*argv, "--batch-size", "2", "--flag-store", str(store), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "scored 7 frames with bright/1" in printed and "test-00009.tar [test/bad/bad_000000]" in printed
    assert len(read_csv(out)) == 7
    assert main(["flagged", "list", "--store", str(store)]) == 0
    assert "4 flag(s) match" in capsys.readouterr().out


def test_the_score_command_reports_user_errors_in_one_line(model, data: Path, tmp_path: Path, capsys) -> None:
    base = ["score", "--repo", str(tmp_path / "models"), "--data", str(data)]
    assert main([*base, "--model", "nope", "--out", str(tmp_path / "a.csv")]) == 2
    assert "no published version" in capsys.readouterr().err
    assert main([*base, "--model", "bright", "--out", str(tmp_path / "a.json")]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err
    assert main(["score", "--model", "bright", "--data", str(tmp_path / "x"), "--out", "a.csv"]) == 2
    assert "data not found" in capsys.readouterr().err
