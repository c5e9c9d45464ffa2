"""A killed batch run loses nothing it finished, and a rerun repeats nothing it already did.

The kill is a real SIGKILL of a real `edgecase score` process, taken while it is inside a shard: the
third shard is a named pipe that the test fills with only the first half of a tar file, so the run
is provably mid-shard (reading, decoding and scoring its first frames) when it dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow.parquet as pq
import pytest
from service_helpers import REPO_ROOT, publish_model, wait_until

from contract.writers import open_writer
from edgecase.cli import main
from service.flagged import FlaggedStore

SHARDS = 4
FRAMES = 6  # per shard; every other frame is bright (an edge case)


def write_shards(root: Path) -> None:
    with open_writer(root, "tar", "test", shard_size=FRAMES) as writer:
        for i in range(SHARDS * FRAMES):
            value = 230 if i % 2 else 30
            writer.write(f"test/x/x_{i:06d}", np.full((8, 8, 3), value, dtype=np.uint8), {"i": i})


def score_argv(repo: Path, data: Path, out: Path, store: Path, *extra: str) -> list[str]:
    return [
        "score", "--repo", str(repo), "--model", "bright", "--data", str(data), "--out", str(out),
        "--flag-store", str(store), "--no-progress", "--batch-size", "2", *extra,
    ]  # fmt: skip


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}


def flag_keys(store_dir: Path) -> list[tuple[str, str]]:
    with FlaggedStore(store_dir) as store:
        records, _ = store.list(limit=1000)
    return sorted((r.metadata["source"], r.key or "") for r in records)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8)
    data = tmp_path / "data"
    write_shards(data)
    return repo, data


def test_kill_9_mid_shard_then_resume_gives_identical_files_and_no_duplicate_flags(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, data = setup
    third = data / "test-00002.tar"
    whole = third.read_bytes()
    third.unlink()
    os.mkfifo(third)
    out, store = tmp_path / "out", tmp_path / "flagged"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-m", "edgecase.cli", *score_argv(repo, data, out, store)]
    log = tmp_path / "killed-run.log"
    with open(log, "wb") as log_handle:
        proc = subprocess.Popen(argv, env=env, stdout=log_handle, stderr=subprocess.STDOUT)
    pipe: list[BinaryIO] = []
    try:
        # Feed half of the third shard through the pipe and keep it open: the run is now inside it.
        feeder = threading.Thread(target=_feed, args=(third, whole[: len(whole) // 2], pipe), daemon=True)
        feeder.start()
        finished = [out / "test-00000.parquet", out / "test-00001.parquet"]
        assert wait_until(lambda: all(p.exists() for p in finished) and not feeder.is_alive(), timeout=60)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for handle in pipe:
            handle.close()
    assert sorted(outputs(out)) == ["test-00000.parquet", "test-00001.parquet"]  # whole files only
    assert not (out / "_summary.json").exists()
    assert len(flag_keys(store)) == 2 * FRAMES // 2

    third.unlink()
    third.write_bytes(whole)
    assert main(score_argv(repo, data, out, store, "--resume")) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert [s["status"] for s in summary["shards"]] == ["skipped", "skipped", "scored", "scored"]
    assert summary["frames"] == SHARDS * FRAMES and summary["edge_cases"] == SHARDS * FRAMES // 2

    clean_out, clean_store = tmp_path / "clean", tmp_path / "clean-flagged"
    assert main(score_argv(repo, data, clean_out, clean_store)) == 0
    assert outputs(out) == outputs(clean_out)  # byte-identical
    keys = flag_keys(store)
    assert keys == flag_keys(clean_store) and len(keys) == len(set(keys)) == SHARDS * FRAMES // 2


def _feed(fifo: Path, data: bytes, keep: list[BinaryIO]) -> None:
    """Write ``data`` into the pipe and leave it open, so its reader waits for the rest."""
    handle = open(fifo, "wb")  # noqa: SIM115 (closed by the test, after the kill)
    keep.append(handle)
    handle.write(data)
    handle.flush()


def test_a_shard_whose_flags_were_kept_but_file_was_not_adds_no_flags_again(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """The window between a shard's flags and its file's rename, made by deleting the file."""
    repo, data = setup
    out, store = tmp_path / "out", tmp_path / "flagged"
    assert main(score_argv(repo, data, out, store)) == 0
    before = outputs(out)
    (out / "test-00001.parquet").unlink()
    assert main(score_argv(repo, data, out, store, "--resume")) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert [s["status"] for s in summary["shards"]] == ["skipped", "scored", "skipped", "skipped"]
    assert outputs(out) == before
    assert len(flag_keys(store)) == SHARDS * FRAMES // 2


def test_resume_redoes_shards_made_by_another_version_and_cut_files(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, data = setup
    out, store = tmp_path / "out", tmp_path / "flagged"
    assert main([*score_argv(repo, data, out, store), "--version", "1"]) == 0
    publish_model(repo, "bright", 2, size=8, threshold=0.95)
    cut = (out / "test-00003.parquet").read_bytes()
    (out / "test-00003.parquet").write_bytes(cut[: len(cut) // 2])
    assert main([*score_argv(repo, data, out, store), "--version", "1", "--resume"]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert [s["status"] for s in summary["shards"]] == ["skipped", "skipped", "skipped", "scored"]

    assert main([*score_argv(repo, data, out, store), "--resume"]) == 0  # now version 2 (highest)
    summary = json.loads((out / "_summary.json").read_text())
    assert [s["status"] for s in summary["shards"]] == ["scored"] * SHARDS
    metadata = pq.read_schema(out / "test-00000.parquet").metadata
    assert metadata[b"version"] == b"2" and metadata[b"threshold"] == b"0.95"
    assert summary["edge_cases"] == 0  # bright frames score 230/255 = 0.90, under the new threshold
