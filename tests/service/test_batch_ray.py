"""The Ray Data engine writes exactly what the local engine writes, on a real (local, 2-CPU) Ray instance.

One Ray instance serves the module: starting Ray takes seconds, so it is started once and shut
down at the end.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from service_helpers import publish_model

from contract.shards import list_shards
from contract.writers import open_writer
from edgecase.cli import main
from service.batch_scoring import score_shards
from service.batch_summary import BatchOptions
from service.flagged import FlaggedStore
from service.registry import ModelRegistry

ray = pytest.importorskip("ray", reason="the ray extra: pip install 'edgecase[ray]'")

# Ray 2.60 warns about its own deprecated defaults (DataContext's fields) from inside ray; not ours.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\."),
    pytest.mark.slow,  # ~40 s on 2 shared cores, most of it starting Ray and its first dataset
]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def make_data(root: Path) -> None:
    """Tar and Parquet shards, loose images in two chunks, a corrupt frame and a truncated shard."""
    rng = np.random.default_rng(0)
    with open_writer(root, "tar", "test", shard_size=5) as writer:
        for i in range(9):
            writer.write(f"test/x/x_{i:06d}", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), {"i": i})
    with open_writer(root, "parquet", "val") as writer:
        for i in range(4):
            writer.write(f"val/n/n_{i:06d}", np.full((12, 16, 3), 60 * i, dtype=np.uint8), {"family": "n"})
    with open_writer(root / "loose", "dir", "cam") as writer:
        for i in range(3):
            writer.write(f"f{i}", np.full((8, 8, 3), 250 - 100 * i, dtype=np.uint8), {})
    with tarfile.open(root / "bad-00000.tar", "w") as tar:
        blob = b"\x89PNG\r\n\x1a\nnot a png"
        info = tarfile.TarInfo("bad/b_000000.png")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    whole = (root / "test-00001.tar").read_bytes()
    (root / "cut-00000.tar").write_bytes(whole[: len(whole) // 2])


def test_local_and_ray_engines_write_identical_files(local_ray: None, tmp_path: Path) -> None:
    from service.batch_ray import score_shards_ray

    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size="16x9")  # a 16:9 model: every frame here is fitted and padded
    model = ModelRegistry(repo).load("bright")
    make_data(tmp_path / "data")
    shards = list_shards([tmp_path / "data"], chunk_size=2)
    options = BatchOptions(batch_size=3, progress=False, max_frame_errors=0.5)

    with FlaggedStore(tmp_path / "local-flags") as store:
        local = score_shards(model, shards, tmp_path / "local", options=options, store=store)
        local_flags = sorted((r.key, r.score, r.image_sha256) for r in store.list(limit=100)[0])
    with FlaggedStore(tmp_path / "ray-flags") as store:
        distributed = score_shards_ray(
            str(repo), model, shards, tmp_path / "ray", options=options, store=store, concurrency=1
        )
        ray_flags = sorted((r.key, r.score, r.image_sha256) for r in store.list(limit=100)[0])

    local_files = {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.parquet")}
    ray_files = {p.name: p.read_bytes() for p in (tmp_path / "ray").glob("*.parquet")}
    assert len(local_files) == len(shards) - 1  # the cut shard has no file in either
    assert ray_files == local_files
    assert ray_flags == local_flags and len(local_flags) == local.edge_cases > 0

    def comparable(summary: dict[str, object]) -> dict[str, object]:
        keys = ("frames", "edge_cases", "errors", "shards", "failures", "exit_status")
        return {k: summary[k] for k in keys}

    ray_summary = json.loads((tmp_path / "ray" / "_summary.json").read_text())
    assert ray_summary["engine"] == "ray"
    assert comparable(ray_summary) == comparable(local.as_dict()) == comparable(distributed.as_dict())
    assert distributed.failed_shards == 1 and distributed.errors == 1

    # The command line's form: the same files again, and exit status 1 for the cut shard.
    argv = ["score", "--engine", "ray", "--concurrency", "1", "--repo", str(repo), "--model", "bright"]
    out = tmp_path / "cli"
    code = main([*argv, "--data", str(tmp_path / "data"), "--out", str(out), "--chunk-size", "2",
                 "--batch-size", "3", "--max-frame-errors", "0.5", "--no-progress"])  # fmt: skip
    assert code == 1
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == local_files
