"""Batch scoring without a server: one Parquet file per shard, every frame a row, failures counted.

The model is the tests' brightness graph (score = mean brightness in [0, 1], threshold 0.5), so the
expected score of a solid grey frame is known exactly. All three input formats (loose images in a
folder, tar shards, Parquet) go through the same run.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from service_helpers import publish_model

from contract.shards import list_shards
from contract.writers import open_writer
from edgecase.cli import main
from service.batch_output import COLUMNS
from service.batch_scoring import score_shards
from service.batch_summary import BatchOptions
from service.flagged import FlaggedStore
from service.registry import ModelRegistry


def solid(value: int, height: int = 8, width: int = 8) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


@pytest.fixture
def model(tmp_path: Path):
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    return ModelRegistry(repo).load("bright")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Three formats in one folder: loose PNGs (other sizes), tar shards (one corrupt frame), Parquet."""
    root = tmp_path / "data"
    with open_writer(root / "loose", "dir", "test") as writer:
        writer.write("cam/dark", solid(20, 16, 24), {})  # non-square, resized by the manifest's rule
        writer.write("cam/bright", solid(240, 32, 32), {})
    with open_writer(root, "tar", "test") as writer:
        for i, value in enumerate([10, 200, 250]):
            writer.write(f"test/x/x_{i:06d}", solid(value), {"family": "x", "strength": 0.5})
    write_tar(root / "test-00009.tar", [("test/bad/bad_000000.png", b"\x89PNG\r\n\x1a\nnot really a png")])
    with open_writer(root, "parquet", "val") as writer:
        for i, value in enumerate([100, 180]):
            writer.write(f"val/normal/normal_{i:06d}", solid(value), {"family": "normal"})
    return root


def read_rows(out: Path) -> dict[str, dict[str, object]]:
    rows = {}
    for path in sorted(out.glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["key"]] = row
    return rows


def test_every_frame_gets_a_row_in_its_shards_file(model, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = BatchOptions(batch_size=2, workers=2, max_frame_errors=0.5)
    summary = score_shards(model, list_shards([data]), out, options=options)
    assert sorted(p.name for p in out.iterdir()) == [
        "_summary.json",
        "data.images-00000.parquet",
        "test-00000.parquet",
        "test-00009.parquet",
        "val-00000.parquet",
    ]
    rows = read_rows(out)
    expected = {
        "loose/cam/dark": 20 * 5 / 8,  # fit-pad: the 16x24 frame becomes 5 of the 8 rows, the rest black
        "loose/cam/bright": 240,
        "test/x/x_000000": 10,
        "test/x/x_000001": 200,
        "test/x/x_000002": 250,
        "val/normal/normal_000000": 100,
        "val/normal/normal_000001": 180,
    }
    for key, value in expected.items():
        row = rows[key]
        assert row["score"] == pytest.approx(value / 255, abs=1e-6)
        assert row["is_edge_case"] == (value / 255 > 0.5)
        assert row["p_value"] == pytest.approx(float(model.manifest.p_values([row["score"]])[0]))
        assert row["error"] is None
    bad = rows["test/bad/bad_000000"]
    assert bad["score"] is None and bad["is_edge_case"] is None and "corrupt" in bad["error"]
    assert rows["test/x/x_000001"]["source"].endswith("test-00000.tar")
    assert (summary.frames, summary.edge_cases, summary.errors) == (8, 4, 1)
    assert summary.exit_status == 0  # 1 of 8 frames failed, within the allowed 0.5


def test_output_files_say_which_model_made_them(model, data: Path, tmp_path: Path) -> None:
    score_shards(model, list_shards([data / "test-00000.tar"]), tmp_path / "out")
    schema = pq.read_schema(tmp_path / "out" / "test-00000.parquet")
    assert schema.names == list(COLUMNS)
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items() if not k.startswith(b"ARROW")}
    assert meta == {
        "model": "bright",
        "version": "1",
        "head": "brightness",
        "threshold": "0.5",
        "target_fpr": "0.05",
        "model_sha256": model.manifest.files["model.onnx"].sha256,
        "edgecase_version": meta["edgecase_version"],
        "source": str(data / "test-00000.tar"),
    }
    rows = pq.read_table(tmp_path / "out" / "test-00000.parquet").column("key").to_pylist()
    assert rows == ["test/x/x_000000", "test/x/x_000001", "test/x/x_000002"]  # reading order


def test_loose_images_are_cut_into_chunks(model, tmp_path: Path) -> None:
    with open_writer(tmp_path / "frames", "dir", "test") as writer:
        for i in range(5):
            writer.write(f"f{i}", solid(40 * i), {})
    shards = list_shards([tmp_path / "frames"], chunk_size=2)
    assert [s.name for s in shards] == ["frames.images-00000", "frames.images-00001", "frames.images-00002"]
    score_shards(model, shards, tmp_path / "out")
    keys = [pq.read_table(tmp_path / "out" / f"{s.name}.parquet").column("key").to_pylist() for s in shards]
    assert keys == [["f0", "f1"], ["f2", "f3"], ["f4"]]


def test_edge_cases_go_into_the_flagged_store_once(model, data: Path, tmp_path: Path) -> None:
    shards = list_shards([data])
    with FlaggedStore(tmp_path / "flagged") as store:
        first = score_shards(model, shards, tmp_path / "a", store=store)
        again = score_shards(model, shards, tmp_path / "b", store=store)  # a full rerun, not resumed
        records, total = store.list(newest_first=False)
    assert total == first.edge_cases == first.stored == 4 and again.stored == 0  # no duplicates
    assert {r.key for r in records} == {
        "loose/cam/bright",
        "test/x/x_000001",
        "test/x/x_000002",
        "val/normal/normal_000001",
    }
    shard_flag = next(r for r in records if r.key == "test/x/x_000001")
    assert shard_flag.metadata["source"].endswith("test-00000.tar") and shard_flag.metadata["family"] == "x"
    assert shard_flag.image_ext == "png"  # the frame as stored, not re-encoded


def test_a_corrupt_shard_is_listed_and_gets_no_file(model, data: Path, tmp_path: Path, capsys) -> None:
    whole = (data / "test-00000.tar").read_bytes()
    (data / "test-00000.tar").write_bytes(whole[: len(whole) // 2])  # cut mid-member
    out = tmp_path / "out"
    argv = ["score", "--repo", str(tmp_path / "models"), "--model", "bright", "--data", str(data)]
    code = main([*argv, "--out", str(out), "--no-progress", "--max-frame-errors", "0.5"])
    assert code == 1
    assert not (out / "test-00000.parquet").exists() and (out / "val-00000.parquet").exists()
    summary = json.loads((out / "_summary.json").read_text())
    failed = {s["shard"]: s["status"] for s in summary["shards"]}
    assert failed["test-00000"] == "failed" and failed["val-00000"] == "scored"
    shard_failure = next(f for f in summary["failures"] if f["key"] == "")
    assert shard_failure["source"].endswith("test-00000.tar") and "truncated" in shard_failure["error"]
    assert "failed" in capsys.readouterr().out


def test_too_many_bad_frames_fail_the_run(model, data: Path, tmp_path: Path, capsys) -> None:
    argv = ["score", "--repo", str(tmp_path / "models"), "--model", "bright", "--data", str(data)]
    assert main([*argv, "--out", str(tmp_path / "strict"), "--no-progress"]) == 1  # 1 of 8 > 0.001
    assert "above --max-frame-errors" in capsys.readouterr().err
    summary = json.loads((tmp_path / "strict" / "_summary.json").read_text())
    assert summary["errors"] == 1 and summary["exit_status"] == 1
    (failure,) = summary["failures"]
    assert failure["key"] == "test/bad/bad_000000" and failure["source"].endswith("test-00009.tar")
    loose = ["--max-frame-errors", "0.2", "--batch-size", "3", "--workers", "1"]
    assert main([*argv, "--out", str(tmp_path / "loose"), "--no-progress", *loose]) == 0
    printed = capsys.readouterr().out
    assert "scored 8 frames in 4 shard(s) with bright/1" in printed and "4 edge cases" in printed


def test_process_and_thread_pools_write_the_same_files(model, data: Path, tmp_path: Path) -> None:
    shards = list_shards([data])
    score_shards(model, shards, tmp_path / "t", options=BatchOptions(pool="thread", batch_size=3))
    score_shards(model, shards, tmp_path / "p", options=BatchOptions(pool="process", batch_size=3))
    for shard in shards:
        name = f"{shard.name}.parquet"
        assert (tmp_path / "t" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


def test_the_score_command_reports_user_errors_in_one_line(model, data: Path, tmp_path: Path, capsys) -> None:
    base = ["score", "--repo", str(tmp_path / "models"), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*base, "--model", "nope"]) == 2
    assert "no published version" in capsys.readouterr().err
    assert main([*base, "--model", "bright", "--max-frame-errors", "2"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main([*base[:-1], str(tmp_path / "scores.csv"), "--model", "bright"]) == 2
    assert "a folder now" in capsys.readouterr().err
    assert main(["score", "--model", "bright", "--data", str(tmp_path / "x"), "--out", "o"]) == 2
    assert "data not found" in capsys.readouterr().err
    twice = ["--data", str(data / "val-00000.parquet"), str(data / "val-00000.parquet")]
    assert main(["score", "--repo", str(tmp_path / "models"), "--model", "bright", *twice, "--out", "o"]) == 2
    assert "both write val-00000.parquet" in capsys.readouterr().err


def test_the_help_names_a_model_export_makes_and_documents_the_exit_status(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out
    assert "--model vae-elbo" in text  # `edgecase export --head vae-elbo` publishes "vae-elbo"
    assert "Exit status:" in text and "--max-frame-errors" in text and "--resume" in text
