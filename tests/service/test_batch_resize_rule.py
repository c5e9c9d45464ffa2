"""`edgecase score` serves any H x W model by the rule its manifest names, on 16:9, 4:3 and square frames.

The same check as tests/service/test_service_resize_rule.py, through batch scoring: every row's score
equals the published graph run directly by onnxruntime on ``resize_frame(decode_frame(bytes), size,
rule)`` (a camera JPEG: on ``decode_resized``, the contract's drafted decode), for loose PNGs and the
same frames in a tar shard. The graph weighs every pixel differently (``build_weighted_graph``), so
another rule, filter or offset changes the score. The report's top-frame tiles follow the model too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from service_helpers import build_weighted_graph, onnx_outputs, publish_model, textured_png

from contract.frames import (
    LEGACY_RESIZE_RULE,
    RESIZE_RULE,
    FrameSize,
    decode_frame,
    decode_resized,
    frame_size,
    probe_frame,
    resize_frame,
)
from contract.writers import open_writer
from edgecase.cli import main
from service.batch_report import TopFrame, read_back, tile_size

FRAMES = {"16x9": (192, 108), "4x3": (144, 108), "square": (108, 108)}  # key -> (width, height)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three aspects as loose PNGs, and the same bytes plus a 1080p camera JPEG in a tar shard."""
    root = tmp_path_factory.mktemp("batch-resize")
    for i, (name, (w, h)) in enumerate(FRAMES.items()):
        (root / "loose").mkdir(exist_ok=True)
        (root / "loose" / f"{name}.png").write_bytes(textured_png(w, h, seed=i))
    with open_writer(root / "shards", "tar", "test") as writer:
        for i, (name, (w, h)) in enumerate(FRAMES.items()):
            writer.write(f"test/{name}", decode_frame(textured_png(w, h, seed=i)), {})
    (root / "camera").mkdir()
    (root / "camera" / "cam.jpg").write_bytes(textured_png(1920, 1080, seed=9, fmt="JPEG", quality=90))
    return root


def sent(data: Path) -> dict[str, bytes]:
    """Row key -> bytes decoding to the frame it scores (a tar member re-encodes its loose PNG's pixels)."""
    loose = {name: (data / "loose" / f"{name}.png").read_bytes() for name in FRAMES}
    return {
        **loose,
        **{f"test/{name}": blob for name, blob in loose.items()},
        "cam": (data / "camera" / "cam.jpg").read_bytes(),
    }


def model_input(blob: bytes, size: str, rule: str) -> np.ndarray:
    """What the model must see: the contract's decode and resize (a JPEG at its draft scale)."""
    if probe_frame(blob).format == "JPEG":
        return decode_resized(blob, size, rule=rule)
    return resize_frame(decode_frame(blob), size, rule)


@pytest.mark.parametrize(
    ("size", "rule"), [("64x36", RESIZE_RULE), ("16", RESIZE_RULE), ("16", LEGACY_RESIZE_RULE)]
)
def test_each_row_scores_as_onnxruntime_on_the_manifests_resize_rule(
    data: Path, tmp_path: Path, size: str, rule: str
) -> None:
    repo = tmp_path / "models"
    version = publish_model(
        repo, "m", 1, size=size, graph=build_weighted_graph(size, seed=3), threshold=0.9,
        resize_rule=None if rule == RESIZE_RULE else rule,
    )  # fmt: skip
    out = tmp_path / "out"
    argv = ["score", "--repo", str(repo), "--model", "m", "--out", str(out), "--no-progress"]
    assert main([*argv, "--data", str(data / "loose"), str(data / "shards"), str(data / "camera")]) == 0

    rows = {
        row["key"]: row for path in sorted(out.glob("*.parquet")) for row in pq.read_table(path).to_pylist()
    }
    assert all(row["error"] is None for row in rows.values())
    blobs = sent(data)
    assert sorted(rows) == sorted(blobs)
    other = LEGACY_RESIZE_RULE if rule == RESIZE_RULE else RESIZE_RULE
    model = frame_size(size)
    for key, blob in blobs.items():
        want = float(onnx_outputs(version, model_input(blob, size, rule))["score"])
        assert rows[key]["score"] == pytest.approx(want, rel=1e-6, abs=1e-7), key
        header = probe_frame(blob)
        if header.width * model.height != header.height * model.width:  # not the model's aspect:
            wrong = float(onnx_outputs(version, model_input(blob, size, other))["score"])
            assert abs(wrong - want) > 1e-3, key  # the two rules differ, and the test tells them apart


def test_the_reports_tiles_show_what_the_model_saw_at_its_aspect(data: Path) -> None:
    # A 256x144 model: tiles of 128x72 by its rule (a 4:3 frame with its bars), a square model's 128x128.
    assert tile_size(FrameSize(144, 256)) == FrameSize(72, 128)
    assert tile_size(FrameSize(16, 16)) == FrameSize(128, 128)
    blobs = sent(data)
    top = [TopFrame(1, "4x3", str(data / "loose" / "4x3.png"), 0.9, 0.01),
           TopFrame(2, "test/16x9", str(data / "shards" / "test-00000.tar"), 0.8, 0.02)]  # fmt: skip
    for rule in (RESIZE_RULE, LEGACY_RESIZE_RULE):
        tiles = read_back(top, data=[], size=FrameSize(72, 128), rule=rule)
        for frame, tile in zip(top, tiles, strict=True):
            assert isinstance(tile, np.ndarray), tile
            assert np.array_equal(tile, resize_frame(decode_frame(blobs[frame.key]), "128x72", rule))
