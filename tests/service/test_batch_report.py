"""`edgecase report OUT_DIR`: the report of a per-shard scoring run, end to end on real files.

The run folder is made here, not by `edgecase score` (built in parallel): two WebDataset tar shards of
solid grey frames (plus one corrupt frame), scored by a published brightness graph in onnxruntime, one
`<shard>.parquet` per shard with the agreed columns and key-value metadata, and `_summary.json`. The
brightness graph scores a frame of grey level v as v / 255, and its calibration scores are
0.30, 0.31, ..., 0.49 (service_helpers.DEFAULT_CALIBRATION), so every number in the report can be
worked out by hand below.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from service_helpers import publish_model, solid_png

from contract.frames import decode_frame, resize_frame
from contract.manifest import MODEL_FILE, load_manifest
from contract.readers import ReadReport, iter_frames
from edgecase.cli import main
from service.batch_output import SCHEMA
from service.batch_report import TILE_PX, TopFrame, load_run, read_back, top_frames
from service.registry import ModelRegistry

# Shard a: four dark frames (score 77/255 = 0.302, below every calibration score but the first), two
# mid-grey (100/255 = 0.392) and a corrupt one; shard b: four bright frames (230/255 = 0.902 > 0.5).
SHARD_A = [
    ("a/dark_0", 77),
    ("a/dark_1", 77),
    ("a/dark_2", 77),
    ("a/dark_3", 77),
    ("a/mid_0", 100),
    ("a/mid_1", 100),
]
SHARD_B = [("b/bright_0", 230), ("b/bright_1", 230), ("b/bright_2", 230), ("b/bright_3", 230)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_scores(out_dir: Path, shard: Path, repo: Path, name: str = "bright", version: int = 1) -> dict:
    """Score one shard as `edgecase score` does and write OUT_DIR/<shard name>.parquet; return its totals."""
    model = ModelRegistry(repo).load(name, version)
    report = ReadReport()
    frames = list(iter_frames(shard, report=report))
    size = model.frame_shape[0]
    scores = model.score(np.stack([resize_frame(f.image, size) for f in frames]))["score"].astype(np.float64)
    p_values = model.manifest.p_values(scores)
    rows = {
        "key": [f.key for f in frames] + [key for _, key, _ in report.errors],
        "source": [f.source for f in frames] + [src for src, _, _ in report.errors],
        "score": [*scores.tolist(), *[None] * len(report.errors)],
        "p_value": [*p_values.tolist(), *[None] * len(report.errors)],
        "is_edge_case": [*(scores > model.threshold).tolist(), *[None] * len(report.errors)],
        "error": [None] * len(frames) + [reason for _, _, reason in report.errors],
    }
    manifest = model.manifest
    metadata = {
        "model": name,
        "version": str(version),
        "head": manifest.model.head,
        "threshold": repr(manifest.threshold.value),
        "target_fpr": repr(manifest.threshold.target_fpr),
        "model_sha256": manifest.files[MODEL_FILE].sha256,
        "edgecase_version": "0.1.0",
    }
    table = pa.Table.from_pydict(rows, schema=SCHEMA.with_metadata(metadata))
    pq.write_table(table, out_dir / f"{shard.name.removesuffix('.tar')}.parquet")
    return {
        "shard": shard.name,
        "source": str(shard),
        "frames": len(rows["key"]),
        "edge_cases": int(np.sum(scores > model.threshold)),
        "errors": len(report.errors),
        "status": "done",
        "failures": [{"source": s, "key": k, "error": r} for s, k, r in report.errors],
    }


@pytest.fixture
def scored_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(OUT_DIR, repo, shards folder) of a finished two-shard run."""
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    shards = tmp_path / "shards"
    shards.mkdir()
    members_a = [(f"{key}.png", solid_png(v, 16)) for key, v in SHARD_A] + [("a/corrupt.png", b"not a png")]
    tar_a = write_tar(shards / "drive-a.tar", members_a)
    tar_b = write_tar(shards / "drive-b.tar", [(f"{key}.png", solid_png(v, 16)) for key, v in SHARD_B])
    out = tmp_path / "scores"
    out.mkdir()
    shard_rows = [write_scores(out, tar, repo) for tar in (tar_a, tar_b)]
    summary = {
        "model": "bright", "version": 1, "head": "brightness", "threshold": 0.5, "target_fpr": 0.05,
        **{total: sum(s[total] for s in shard_rows) for total in ("frames", "edge_cases", "errors")},
        "seconds": 0.1,
        "shards": [{k: v for k, v in s.items() if k != "failures"} for s in shard_rows],
        "failures": [f for s in shard_rows for f in s["failures"]], "stage_frames_per_s": {},
    }  # fmt: skip
    (out / "_summary.json").write_text(json.dumps(summary))
    return out, repo, shards


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*([-0-9.e+]+)", text)
    assert match, f"{label!r} not in the report"
    return float(match.group(1))


def test_the_report_states_drift_and_shard_rates_that_match_a_hand_computation(
    scored_run: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, repo, _ = scored_run
    assert main(["report", str(out), "--repo", str(repo), "--top-k", "3"]) == 0
    assert "report:" in capsys.readouterr().out
    text = (out / "report" / "report.md").read_text()
    numbers = json.loads((out / "report" / "report.json").read_text())

    # PSI bins: deciles of 0.30..0.49 (linear interpolation) are 0.319, 0.338, ..., 0.471, each holding
    # two calibration scores (e = 0.1). The batch: dark frames in bin 1 (4/10), mid-grey ones in bin 5
    # (0.392 < 0.395, 2/10), bright ones in bin 10 (4/10), seven empty bins floored at 1e-4.
    hand_psi = 2 * (0.4 - 0.1) * math.log(0.4 / 0.1) + (0.2 - 0.1) * math.log(0.2 / 0.1)
    hand_psi += 7 * (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert number_after("PSI =", text) == pytest.approx(hand_psi, abs=5e-5)
    assert numbers["psi"] == pytest.approx(hand_psi, rel=1e-9)
    assert "large shift" in text
    # KS: at any x in [0.49, 0.902) every calibration score is <= x (F = 1) and 6 of 10 batch scores (0.6).
    assert number_after("KS statistic D =", text) == pytest.approx(0.4, abs=1e-4)
    assert numbers["ks"] == pytest.approx(0.4, abs=1e-12)

    # 11 rows, one corrupt frame, 4 edge cases out of 10 scored.
    assert (numbers["frames"], numbers["scored"], numbers["errors"], numbers["edge_cases"]) == (11, 10, 1, 4)
    shards = {s["name"]: s for s in numbers["shards"]}
    assert (shards["drive-a"]["rate"], shards["drive-a"]["tail_p"], shards["drive-a"]["errors"]) == (
        0.0,
        1.0,
        1,
    )
    # Four flags in four frames at a target FPR of 0.05: P(X >= 4) = 0.05 ** 4.
    assert shards["drive-b"]["tail_p"] == pytest.approx(0.05**4, rel=1e-9)
    assert "| **drive-b** | 4 | 4 | 0 | 4 | 100.000% | 20.00 | 6.25e-06 |" in text
    assert "| drive-a | 7 | 6 | 1 | 0 | 0.000% | 0.00 | 1 |" in text
    assert "a/corrupt" in text  # the summary's failures are listed

    # Top 3: the bright frames, ties in score broken by key.
    assert [t["key"] for t in numbers["top_frames"]] == ["b/bright_0", "b/bright_1", "b/bright_2"]
    assert numbers["top_frames"][0]["score"] == pytest.approx(230 / 255, abs=1e-6)


def test_the_figures_are_valid_pngs_of_a_readable_size(scored_run: tuple[Path, Path, Path]) -> None:
    out, repo, _ = scored_run
    report_dir = out.parent / "elsewhere"
    assert main(["report", str(out), "--repo", str(repo), "--top-k", "5", "--out", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    for name in ("scores", "psi", "shards", "top_frames"):
        assert f"]({name}.png)" in text  # linked relative to the report, so the folder can move
        with Image.open(report_dir / f"{name}.png") as image:
            assert image.format == "PNG"
            assert 400 <= image.width <= 2000 and 200 <= image.height <= 1600, (name, image.size)
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 5, f"{name}.png is blank"


def test_the_top_frames_are_read_back_from_their_shards_even_after_the_shards_moved(
    scored_run: tuple[Path, Path, Path],
) -> None:
    out, _, shards = scored_run
    top = top_frames(load_run(out), 5)
    expected = resize_frame(decode_frame(solid_png(230, 16)), TILE_PX)
    tiles = read_back(top, data=[])
    assert all(isinstance(tile, np.ndarray) and np.array_equal(tile, expected) for tile in tiles[:4])
    assert isinstance(tiles[4], np.ndarray) and int(tiles[4].mean()) == 100  # fifth: a mid-grey frame

    moved = shards.parent / "archive" / "2026"
    moved.mkdir(parents=True)
    for tar in shards.glob("*.tar"):
        shutil.move(tar, moved / tar.name)
    lost = read_back(top, data=[])
    assert all(isinstance(tile, str) and "not found: drive-b.tar" in tile for tile in lost[:4])
    found = read_back(top, data=[shards.parent / "archive"])
    assert all(isinstance(tile, np.ndarray) for tile in found)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no files", "no <shard>.parquet score files"),
        ("no metadata", "no model/version/threshold/target_fpr in the Parquet metadata"),
        ("other repo", "is not the graph that made these scores"),
        ("missing model", "model bright/1 that made these scores is not usable"),
        ("mixed versions", "scored by different model versions (bright/1, bright/2)"),
    ],
)
def test_a_run_that_cannot_be_reported_on_is_a_clear_error(
    scored_run: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    breakage: str,
    message: str,
) -> None:
    out, repo, shards = scored_run
    if breakage == "no files":
        for path in out.glob("*.parquet"):
            path.unlink()
    elif breakage == "no metadata":
        path = out / "drive-a.parquet"
        pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
    elif breakage == "other repo":  # same name and version, another graph
        repo = tmp_path / "other-models"
        publish_model(repo, "bright", 1, size=16, threshold=0.5)
    elif breakage == "missing model":
        repo = tmp_path / "empty-models"
        repo.mkdir()
    else:
        publish_model(repo, "bright", 2, size=8, threshold=0.6)
        write_scores(out, shards / "drive-b.tar", repo, version=2)
    assert main(["report", str(out), "--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert load_manifest(Path(scored_run[1]) / "bright" / "1")  # the published model is untouched


def test_without_matplotlib_the_report_says_what_to_install(
    scored_run: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, repo, _ = scored_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ModuleNotFoundError
    assert main(["report", str(out), "--repo", str(repo)]) == 2
    assert "pip install 'edgecase[report]'" in capsys.readouterr().err
    assert not (out / "report").exists()


def test_a_loose_image_source_is_the_frame_itself(tmp_path: Path) -> None:
    folder = tmp_path / "frames" / "cam0"
    folder.mkdir(parents=True)
    (folder / "f_000.png").write_bytes(solid_png(200, 16))
    (folder / "f_001.png").write_bytes(b"truncated")
    top = [
        TopFrame(1, "cam0/f_000", str(folder / "f_000.png"), 0.8, 0.01),
        TopFrame(2, "cam0/f_001", str(folder / "f_001.png"), 0.7, 0.02),
    ]
    good, bad = read_back(top, data=[])
    assert isinstance(good, np.ndarray) and good.shape == (TILE_PX, TILE_PX, 3) and int(good.mean()) == 200
    assert isinstance(bad, str) and bad.startswith("unreadable: ")
