"""Batch scoring against object storage: sources, output and model repository all in an S3 bucket.

The bucket lives in moto's standalone S3 server, a real HTTP server started on loopback by the test;
edgecase reaches it through fsspec/s3fs exactly as it would reach AWS (endpoint and fake credentials
from the environment).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from service_helpers import free_port, publish_model, wait_until

from contract.writers import open_writer
from edgecase.cli import main

s3fs = pytest.importorskip("s3fs", reason="the s3 extra: pip install 'edgecase[s3]'")
MOTO = shutil.which("moto_server")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    if MOTO is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]', in the dev extra)")
    port = free_port()
    proc = subprocess.Popen(
        [MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                    return True
            except OSError:
                return False

        assert wait_until(up, timeout=60), "moto_server did not start"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[object, str]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    name = f"edgecase-{tmp_path.name.lower().replace('_', '-')[:40]}"
    fs.mkdir(name)
    return fs, name


def make_data(root: Path) -> None:
    with open_writer(root, "tar", "test", shard_size=3) as writer:
        for i, value in enumerate([10, 200, 250, 90, 140]):
            writer.write(f"test/x/x_{i:06d}", np.full((8, 8, 3), value, dtype=np.uint8), {"family": "x"})
    with open_writer(root, "parquet", "val") as writer:
        for i, value in enumerate([100, 180]):
            writer.write(f"val/n/n_{i:06d}", np.full((8, 8, 3), value, dtype=np.uint8), {"family": "n"})


def rows_without_source(path_or_file: object) -> list[dict[str, object]]:
    table = pq.read_table(path_or_file)
    return [{k: v for k, v in row.items() if k != "source"} for row in table.to_pylist()]


def test_sources_output_and_repository_in_a_bucket(bucket: tuple[object, str], tmp_path: Path) -> None:
    fs, name = bucket
    assert isinstance(fs, s3fs.S3FileSystem)
    local = tmp_path / "local"
    publish_model(local / "models", "bright", 1, size=8)
    make_data(local / "data")
    fs.put(str(local / "models") + "/", f"{name}/models/", recursive=True)
    fs.put(str(local / "data") + "/", f"{name}/shards/", recursive=True)

    remote = [
        "score", "--repo", f"s3://{name}/models", "--model", "bright", "--data", f"s3://{name}/shards/",
        "--out", f"s3://{name}/scores/", "--no-progress", "--batch-size", "2",
    ]  # fmt: skip
    assert main(remote) == 0
    outputs = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{name}/scores"))
    assert outputs == ["_summary.json", "test-00000.parquet", "test-00001.parquet", "val-00000.parquet"]

    assert main(["score", "--repo", str(local / "models"), "--model", "bright", "--data",
                 str(local / "data"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0  # fmt: skip
    for shard in ("test-00000", "test-00001", "val-00000"):
        with fs.open(f"{name}/scores/{shard}.parquet", "rb") as handle:
            got = rows_without_source(handle)
            handle.seek(0)
            meta = pq.read_schema(handle).metadata
        assert got == rows_without_source(tmp_path / "out" / f"{shard}.parquet")
        assert meta[b"source"].decode().startswith(f"s3://{name}/shards/")
    with fs.open(f"{name}/scores/test-00000.parquet", "rb") as handle:
        sources = pq.read_table(handle).column("source").to_pylist()
    assert set(sources) == {f"s3://{name}/shards/test-00000.tar"}

    assert main([*remote, "--resume"]) == 0  # a rerun reads the bucket's files and keeps them all
    summary = json.loads(fs.cat_file(f"{name}/scores/_summary.json"))
    assert [s["status"] for s in summary["shards"]] == ["skipped"] * 3 and summary["frames"] == 7
    assert not [p for p in fs.ls(f"{name}/scores") if p.rsplit("/", 1)[-1].startswith(".")]


def test_a_missing_bucket_prefix_or_model_is_a_usage_error(bucket: tuple[object, str], capsys) -> None:
    _, name = bucket
    argv = ["score", "--repo", f"s3://{name}/models", "--model", "bright", "--out", f"s3://{name}/o/"]
    assert main([*argv, "--data", f"s3://{name}/nothing-here/"]) == 2
    assert "data not found" in capsys.readouterr().err
