"""The flagged-frame store: durable, content-addressed, filterable, reviewable, exportable for training."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from contract.frames import decode_frame, encode_png
from contract.labels import read_labels
from service.flagged import FlaggedNotFoundError, FlaggedStore, NewFlag


def frame_png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def jpeg_bytes(seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FlaggedStore]:
    with FlaggedStore(tmp_path / "store") as opened:
        yield opened


def add(store: FlaggedStore, seed: int = 0, **overrides: object):
    fields: dict = {"model": "vae", "version": 1, "score": 9.5, "p_value": 0.001, "key": f"k{seed}"}
    fields.update(overrides)
    return store.add(frame_png(seed), **fields)


def test_add_returns_the_record_and_get_reads_it_back(store: FlaggedStore) -> None:
    record = add(store, metadata={"camera": "front", "speed": 12.5})
    assert record.id >= 1 and record.review == "unreviewed" and record.reviewed_at is None
    assert store.get(record.id) == record
    assert record.metadata == {"camera": "front", "speed": 12.5}
    assert record.created_at.tzinfo is not None
    assert abs(record.created_at - datetime.now(UTC)) < timedelta(seconds=10)


def test_images_are_content_addressed_and_stored_once(store: FlaggedStore) -> None:
    first = add(store, seed=1, key="a")
    second = add(store, seed=1, key="b")  # the same frame flagged again
    other = add(store, seed=2)
    assert first.id != second.id and first.image_sha256 == second.image_sha256
    path = store.image_path(first.id)
    assert path == store.root / "images" / first.image_sha256[:2] / f"{first.image_sha256}.png"
    assert path.read_bytes() == frame_png(1)
    stored = sorted(p for p in (store.root / "images").rglob("*") if p.is_file())
    assert stored == sorted([path, store.image_path(other.id)])  # two files, no temporaries left
    assert store.count() == 3


def test_read_image_gives_bytes_and_media_type(store: FlaggedStore) -> None:
    record = store.add(jpeg_bytes(3), model="vae", version=1, score=1.0, p_value=0.5, ext=".JPEG")
    data, media_type = store.read_image(record.id)
    assert data == jpeg_bytes(3) and media_type == "image/jpeg" and record.image_ext == "jpg"


def test_a_reopened_store_sees_every_committed_flag(tmp_path: Path) -> None:
    with FlaggedStore(tmp_path / "s") as first:
        ids = [add(first, seed=i).id for i in range(5)]
    with FlaggedStore(tmp_path / "s") as again:
        assert [r.id for r in again.list(newest_first=False)[0]] == ids
        assert all(again.image_path(i).is_file() for i in ids)


def test_the_database_can_live_elsewhere(tmp_path: Path) -> None:
    with FlaggedStore(tmp_path / "images-root", db_path=tmp_path / "db" / "flags.db") as store:
        add(store)
    assert (tmp_path / "db" / "flags.db").is_file()
    assert not (tmp_path / "images-root" / "flagged.sqlite").exists()


def test_list_filters_pages_and_counts_the_total(store: FlaggedStore) -> None:
    for i in range(6):
        add(store, seed=i, model="vae" if i < 4 else "gan", version=1 + i % 2)
    page, total = store.list(model="vae", limit=2)
    assert total == 4 and [r.id for r in page] == [4, 3]  # newest first
    page, total = store.list(model="vae", limit=2, offset=2)
    assert total == 4 and [r.id for r in page] == [2, 1]
    assert store.list(model="vae", version=2)[1] == 2
    assert store.list(model="nope")[0] == []
    assert [r.id for r in store.list(newest_first=False, limit=3)[0]] == [1, 2, 3]


def test_list_filters_by_time_window(store: FlaggedStore) -> None:
    record = add(store)
    just_before = record.created_at - timedelta(milliseconds=1)
    assert store.list(since=just_before)[1] == 1
    assert store.list(until=just_before)[1] == 0
    assert store.list(since=record.created_at + timedelta(seconds=1))[1] == 0
    naive_utc = (record.created_at - timedelta(seconds=1)).replace(tzinfo=None)
    assert store.list(since=naive_utc)[1] == 1  # naive datetimes are UTC


def test_review_sets_the_label_and_filters_by_it(store: FlaggedStore) -> None:
    a, b, _ = add(store, seed=1), add(store, seed=2), add(store, seed=3)
    reviewed = store.review(a.id, "normal")
    assert reviewed.review == "normal" and reviewed.reviewed_at is not None
    store.review(b.id, "edge_case")
    store.review(b.id, "normal")  # a second review overwrites the first
    assert store.list(review="normal")[1] == 2
    assert store.list(review="unreviewed")[1] == 1
    assert store.list(review="edge_case")[1] == 0


def test_bad_input_is_refused_with_a_clear_error(store: FlaggedStore) -> None:
    with pytest.raises(ValueError, match="review label"):
        store.review(add(store).id, "maybe")
    with pytest.raises(FlaggedNotFoundError, match="no flagged frame with id 999"):
        store.review(999, "normal")
    with pytest.raises(FlaggedNotFoundError):
        store.get(999)
    with pytest.raises(FlaggedNotFoundError):
        store.image_path(999)
    with pytest.raises(ValueError, match="extension"):
        store.add(b"x", model="m", version=1, score=1, p_value=1, ext="gif")
    with pytest.raises(ValueError, match="0 bytes"):
        store.add(b"", model="m", version=1, score=1, p_value=1)
    with pytest.raises(ValueError, match="JSON"):
        store.add(b"x", model="m", version=1, score=1, p_value=1, metadata={"when": datetime.now()})
    with pytest.raises(ValueError, match="finite"):
        store.add(b"x", model="m", version=1, score=float("nan"), p_value=1)
    with pytest.raises(ValueError, match="review must be"):
        store.list(review="maybe")
    assert store.count() == 1  # nothing half-written by the refused calls


def test_add_many_commits_several_flags_at_once(store: FlaggedStore) -> None:
    flags = [NewFlag(frame_png(i), "vae", 3, float(i), 0.01, key=f"f{i}") for i in range(4)]
    records = store.add_many(flags)
    assert [r.key for r in records] == ["f0", "f1", "f2", "f3"]
    assert store.list(version=3)[1] == 4


def test_concurrent_threads_lose_no_flag(store: FlaggedStore) -> None:
    ids: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(15):
            record = add(store, seed=(t * 100 + i) % 7)  # shared images across threads too
            with lock:
                ids.append(record.id)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 90 and store.count() == 90
    assert all(store.image_path(i).is_file() for i in ids)


def test_several_processes_can_write_one_store(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    FlaggedStore(root).close()
    script = textwrap.dedent(
        f"""
        import sys
        from service.flagged import FlaggedStore
        worker = int(sys.argv[1])
        with FlaggedStore({str(root)!r}) as store:
            for i in range(20):
                store.add(bytes([worker, i]) * 50, model="m", version=worker, score=1.0, p_value=0.1)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)]) for w in range(1, 4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    with FlaggedStore(root) as store:
        assert store.count() == 60
        assert {v: store.list(version=v)[1] for v in (1, 2, 3)} == {1: 20, 2: 20, 3: 20}


def test_export_of_reviewed_normals_is_a_training_folder(store: FlaggedStore, tmp_path: Path) -> None:
    keep = [add(store, seed=i) for i in range(3)]
    duplicate = add(store, seed=0)  # same frame as keep[0]
    jpeg = store.add(jpeg_bytes(9), model="vae", version=1, score=5.0, p_value=0.01, ext="jpg")
    for record in [*keep, duplicate, jpeg]:
        store.review(record.id, "normal")
    add(store, seed=50)  # unreviewed: not exported with --review normal

    out = tmp_path / "reviewed"
    assert store.export("normal", out) == 4  # the duplicate frame is written once
    labels = read_labels(out)
    assert [row.key for row in labels] == [
        "train/normal/normal_000001",
        "train/normal/normal_000002",
        "train/normal/normal_000003",
        "train/normal/normal_000005",
    ]
    assert all(row.normal and row.split == "train" and row.strength == 0.0 for row in labels)
    for row in labels:
        frame = decode_frame((out / row.path).read_bytes())
        assert frame.shape == (8, 8, 3)
    assert (out / labels[-1].path).read_bytes().startswith(b"\x89PNG")  # the JPEG became a PNG
    assert (out / "flagged_export.json").is_file()


def test_export_of_edge_cases_and_refusing_to_overwrite(store: FlaggedStore, tmp_path: Path) -> None:
    store.review(add(store, seed=1).id, "edge_case")
    add(store, seed=2)
    out = tmp_path / "edge"
    assert store.export("edge_case", out) == 1
    (row,) = read_labels(out)
    assert (row.split, row.family, row.strength) == ("test", "edge_case", 1.0)
    with pytest.raises(FileExistsError):
        store.export("edge_case", out)
    assert store.export("unreviewed", out, overwrite=True) == 1
    assert store.export("normal", tmp_path / "empty") == 0
    assert read_labels(tmp_path / "empty") == []
    with pytest.raises(ValueError, match="review must be"):
        store.export("all", tmp_path / "x")


def test_exported_normals_are_read_as_training_frames(store: FlaggedStore, tmp_path: Path) -> None:
    """The round trip the store exists for: reviewed-as-normal frames join the next training set."""
    from training.data import load_training_frames

    for seed in range(3):
        store.review(add(store, seed=seed).id, "normal")
    store.export("normal", tmp_path / "reviewed")
    data = load_training_frames([tmp_path / "reviewed"], size=4)
    # The export is a train split; a seeded share of it is held out to validate and calibrate.
    assert data.train.shape == (2, 4, 4, 3) and data.train.dtype == np.uint8
    assert data.val.shape == (1, 4, 4, 3)


def test_the_flagged_command_reviews_lists_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgecase.cli import main

    root = tmp_path / "store"
    with FlaggedStore(root) as store:
        first, _ = add(store, seed=1), add(store, seed=2)
    assert main(["flagged", "review", str(first.id), "normal", "--store", str(root)]) == 0
    assert "reviewed as normal" in capsys.readouterr().out
    assert main(["flagged", "list", "--store", str(root), "--review", "normal"]) == 0
    assert "1 flag(s) match" in capsys.readouterr().out
    out = tmp_path / "reviewed"
    assert main(["flagged", "export", "--review", "normal", "--out", str(out), "--store", str(root)]) == 0
    assert "exported 1 normal frame(s)" in capsys.readouterr().out
    assert [row.key for row in read_labels(out)] == [f"train/normal/normal_{first.id:06d}"]
    # user errors: one line on stderr, exit code 2
    assert main(["flagged", "export", "--review", "normal", "--out", str(out), "--store", str(root)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["flagged", "review", "999", "normal", "--store", str(root)]) == 2
    assert "no flagged frame with id 999" in capsys.readouterr().err
    assert main(["flagged", "list", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no flagged-frame store" in capsys.readouterr().err
