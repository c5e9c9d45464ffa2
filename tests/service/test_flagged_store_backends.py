"""Both flagged-store backends keep the same promises: the embedded one (SQLite + files) and the shared
one (a real PostgreSQL + a real S3-compatible server, moto, on loopback).

Each test runs on both backends (one empty store per test: a fresh folder, or a fresh database and
prefix); a few say something only one backend has (migrations, a shared folder for images).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from store_servers import fresh_database, make_bucket, moto_s3, postgres_server

from contract.frames import decode_frame, encode_png
from contract.labels import read_labels
from service.flag_store import FlaggedNotFoundError, FlagStore, NewFlag, Retention

OpenStore = Callable[..., FlagStore]


def frame_png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, dict[str, str], str]]:
    """One PostgreSQL and one moto S3 server for the module; the AWS_* variables set for s3fs."""
    with postgres_server() as pg_url, moto_s3() as aws, pytest.MonkeyPatch.context() as env:
        for name, value in aws.items():
            env.setenv(name, value)
        yield pg_url, aws, make_bucket(aws)


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens a store (again and again: every call is another process's view of the same store)."""
    opened: list[FlagStore] = []
    if request.param == "postgres":
        pg_url, _, bucket = request.getfixturevalue("servers")
        from service.flagged_postgres import PostgresFlagStore

        database, images = fresh_database(pg_url), f"s3://{bucket}/{uuid.uuid4().hex[:8]}/"

        def make(**kwargs: Any) -> FlagStore:
            opened.append(PostgresFlagStore(database, images, retention=kwargs.pop("retention", None)))
            opened[-1].max_image_bytes = kwargs.pop("max_image_bytes", 0)
            return opened[-1]
    else:
        from service.flagged import FlaggedStore

        def make(**kwargs: Any) -> FlagStore:
            opened.append(FlaggedStore(tmp_path / "store", retention=kwargs.pop("retention", None)))
            opened[-1].max_image_bytes = kwargs.pop("max_image_bytes", 0)
            return opened[-1]

    try:
        yield make
    finally:
        for store in opened:
            store.close()


def add(store: FlagStore, seed: int = 0, **overrides: Any) -> Any:
    fields: dict[str, Any] = {"model": "vae", "version": 1, "score": 9.5, "p_value": 0.001, "key": f"k{seed}"}
    fields.update(overrides)
    return store.add(frame_png(seed), **fields)


def image_count(store: FlagStore) -> int:
    """Images physically stored (files in the folder, or objects under the prefix)."""
    images: Any = getattr(store, "images")  # noqa: B009 - both backends have one; the interface does not say
    if hasattr(images, "fs"):
        return len(images.fs.find(images.root))
    return sum(1 for p in images.root.rglob("*") if p.is_file())


def test_add_get_list_review_and_read_the_image(open_store: OpenStore) -> None:
    store = open_store()
    first = add(store, seed=1, metadata={"camera": "front", "speed": 12.5})
    second = add(store, seed=2, model="gan", version=2)
    assert store.get(first.id) == first and first.review == "unreviewed"
    assert first.metadata == {"camera": "front", "speed": 12.5}
    assert store.read_image(first.id) == (frame_png(1), "image/png")
    page, total = store.list(model="vae")
    assert total == 1 and [r.id for r in page] == [first.id]
    assert [r.id for r in store.list()[0]] == [second.id, first.id]  # newest first
    just_before = first.created_at - timedelta(milliseconds=1)
    assert store.list(since=just_before)[1] == 2 and store.list(until=just_before)[1] == 0
    assert store.list(since=second.created_at + timedelta(seconds=1))[1] == 0
    reviewed = store.review(first.id, "normal")
    assert reviewed.review == "normal" and reviewed.reviewed_at is not None
    assert store.list(review="normal")[1] == 1 and store.list(review="unreviewed")[1] == 1
    with pytest.raises(FlaggedNotFoundError):
        store.review(10_000, "normal")
    with pytest.raises(ValueError, match="review label"):
        store.review(first.id, "maybe")
    assert open_store().get(first.id).review == "normal"  # another replica sees it


def test_the_routes_serve_the_image_and_a_missing_one_is_a_404(open_store: OpenStore) -> None:
    import asyncio

    import httpx
    from fastapi import FastAPI

    from service.errors import install_error_handlers
    from service.routes.flagged import router

    store = open_store()
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.store = store
    kept, lost = add(store, seed=1), add(store, seed=2)
    store.images.delete(lost.image_sha256, lost.image_ext)  # type: ignore[attr-defined]  # by hand

    async def get(url: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(url)

    image = asyncio.run(get(f"/flagged/{kept.id}/image"))
    assert image.status_code == 200 and image.content == frame_png(1)
    assert (
        image.headers["content-type"] == "image/png"
        and f"flag-{kept.id}.png" in image.headers["content-disposition"]
    )
    missing = asyncio.run(get(f"/flagged/{lost.id}/image"))
    assert missing.status_code == 404 and "missing" in missing.json()["detail"]
    assert asyncio.run(get("/flagged/999999/image")).status_code == 404
    assert asyncio.run(get("/flagged?review=unreviewed")).json()["total"] == 2


def test_identical_frames_share_one_image(open_store: OpenStore) -> None:
    store = open_store()
    a, b = add(store, seed=3, key="a"), add(store, seed=3, key="b")
    add(store, seed=4)
    assert a.id != b.id and a.image_sha256 == b.image_sha256
    stats = store.stats()
    assert (stats.frames, stats.images) == (3, 2) and stats.bytes == len(frame_png(3)) + len(frame_png(4))
    assert image_count(store) == 2


def test_an_idempotency_key_stores_a_flag_once_across_replicas(open_store: OpenStore) -> None:
    one, two = open_store(), open_store()
    flag = NewFlag(frame_png(5), "vae", 1, 3.0, 0.01, key="frame-7", idempotency_key="vae/1/shard-0/frame-7")
    first = one.add_many([flag])[0]
    again = two.add_many([flag, NewFlag(frame_png(6), "vae", 1, 2.0, 0.02, key="frame-8")])
    assert again[0] == first and again[1].id != first.id
    in_one_batch = one.add_many([NewFlag(frame_png(7), "vae", 1, 2.0, 0.5, idempotency_key="k")] * 2)
    assert in_one_batch[0].id == in_one_batch[1].id
    assert one.count() == 3


def test_concurrent_adds_from_two_replicas_lose_nothing(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    ids: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(8):
            record = add(stores[t % 2], seed=(t * 10 + i) % 5)  # images shared across threads too
            with lock:
                ids.append(record.id)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(set(ids)) == 32 and stores[0].count() == 32
    assert all(stores[1].read_image(i)[0] for i in ids)


def test_retention_deletes_the_oldest_unreviewed_first_and_their_images(open_store: OpenStore) -> None:
    store = open_store(retention=Retention(max_frames=3))
    records = [add(store, seed=i) for i in range(5)]
    store.review(records[0].id, "normal")  # the oldest, but reviewed: kept while unreviewed ones remain
    assert store.prune() == 2
    kept = sorted(r.id for r in store.list()[0])
    assert kept == [records[0].id, records[3].id, records[4].id]
    assert store.stats().images == 3 and image_count(store) == 3  # the deleted flags' images are gone
    assert store.prune() == 0  # already within bounds


def test_retention_by_bytes_then_reviewed_flags_go_too(open_store: OpenStore) -> None:
    size = len(frame_png(0))
    store = open_store(retention=Retention(max_bytes=2 * size))
    records = [add(store, seed=0)] + [add(store, seed=i) for i in range(1, 4)]
    for record in records:
        store.review(record.id, "edge_case")
    store.prune()
    stats = store.stats()
    assert stats.bytes <= 2 * size and stats.frames == 2
    assert [r.id for r in store.list(newest_first=False)[0]] == [records[2].id, records[3].id]


def test_an_image_retention_deleted_is_written_again_by_a_later_flag(open_store: OpenStore) -> None:
    store = open_store(retention=Retention(max_frames=1))
    add(store, seed=8)
    add(store, seed=9)
    store.prune()  # seed 8's flag and image are gone
    again = add(store, seed=8)
    assert store.read_image(again.id)[0] == frame_png(8)


def test_a_frame_over_the_size_cap_is_stored_reencoded_within_it(open_store: OpenStore) -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    original = encode_png(noisy)
    store = open_store(max_image_bytes=len(original) // 4)
    record = store.add(original, model="vae", version=1, score=1.0, p_value=0.1)
    data, media_type = store.read_image(record.id)
    assert media_type == "image/png" and len(data) <= len(original) // 4
    frame = decode_frame(data)
    assert frame.shape[0] < 128 and abs(frame.shape[0] - frame.shape[1]) <= 1  # shrunk, aspect kept
    small = store.add(frame_png(1), model="vae", version=1, score=1.0, p_value=0.1)
    assert store.read_image(small.id)[0] == frame_png(1)  # within the cap: kept as sent


def test_export_reads_images_through_the_store(open_store: OpenStore, tmp_path: Path) -> None:
    store = open_store()
    for seed in range(3):
        store.review(add(store, seed=seed).id, "normal")
    out = tmp_path / "reviewed"
    assert store.export("normal", out) == 3
    labels = read_labels(out)
    assert len(labels) == 3 and all(
        decode_frame((out / row.path).read_bytes()).shape == (8, 8, 3) for row in labels
    )


def test_the_flagged_command_works_on_the_shared_store(
    servers: tuple[str, dict[str, str], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgecase.cli import main
    from service.flagged_postgres import PostgresFlagStore

    pg_url, _, bucket = servers
    database, images = fresh_database(pg_url), f"s3://{bucket}/cli/"
    with PostgresFlagStore(database, images) as store:
        first = add(store, seed=1)
        add(store, seed=2)
    where = ["--store", database, "--images", images]
    assert main(["flagged", "review", str(first.id), "normal", *where]) == 0
    assert main(["flagged", "list", "--review", "normal", *where]) == 0
    assert "1 flag(s) match" in capsys.readouterr().out
    out = tmp_path / "reviewed"
    assert main(["flagged", "export", "--review", "normal", "--out", str(out), *where]) == 0
    assert [row.key for row in read_labels(out)] == [f"train/normal/normal_{first.id:06d}"]
    assert main(["flagged", "list", "--store", database]) == 2
    assert "needs --images" in capsys.readouterr().err


def test_replicas_starting_together_migrate_the_schema_once(servers: tuple[str, dict[str, str], str]) -> None:
    import psycopg

    from service.flagged_postgres import SCHEMA_VERSION, PostgresFlagStore

    pg_url, _, bucket = servers
    database = fresh_database(pg_url)
    barrier = threading.Barrier(4)
    stores: list[FlagStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait(30)
        try:
            stores.append(PostgresFlagStore(database, f"s3://{bucket}/migrate/", pool_size=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for store in stores:
        store.close()
    assert not errors and len(stores) == 4
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT version FROM flags_schema_version").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("INSERT INTO flags_schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="upgrade edgecase"):
        PostgresFlagStore(database, f"s3://{bucket}/migrate/")


def test_the_shared_store_can_keep_images_in_a_shared_folder(
    servers: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    from service.flagged_postgres import PostgresFlagStore

    database = fresh_database(servers[0])
    with (
        PostgresFlagStore(database, str(tmp_path / "nfs")) as one,
        PostgresFlagStore(database, str(tmp_path / "nfs")) as two,
    ):
        record = add(one, seed=4)
        assert two.read_image(record.id)[0] == frame_png(4)
        assert (tmp_path / "nfs" / record.image_sha256[:2] / f"{record.image_sha256}.png").is_file()


def test_an_unreachable_database_fails_at_startup_with_its_name(tmp_path: Path) -> None:
    from service.flagged_postgres import PostgresFlagStore
    from service.launch import free_port

    url = f"postgresql://edgecase:secret@127.0.0.1:{free_port()}/edgecase"
    with pytest.raises(RuntimeError, match="cannot reach") as caught:
        PostgresFlagStore(url, str(tmp_path / "images"), connect_timeout_s=1.0)
    assert "secret" not in str(caught.value) and "edgecase:***@127.0.0.1" in str(caught.value)


def test_a_missing_bucket_fails_at_startup(servers: tuple[str, dict[str, str], str]) -> None:
    from service.flagged_postgres import PostgresFlagStore

    with pytest.raises(ValueError, match="bucket 'no-such-bucket'"):
        PostgresFlagStore(fresh_database(servers[0]), "s3://no-such-bucket/flagged/")


def test_a_version_one_sqlite_store_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    from service.flagged import FlaggedStore

    root = tmp_path / "old"
    (root / "images" / "ab").mkdir(parents=True)
    (root / "images" / "ab" / f"{'ab' * 32}.png").write_bytes(b"12345")
    with sqlite3.connect(root / "flagged.sqlite") as conn:  # the schema before retention existed
        conn.execute(
            "CREATE TABLE flags (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL,"
            " model TEXT NOT NULL, version INTEGER NOT NULL, score REAL NOT NULL, p_value REAL NOT NULL,"
            " client_key TEXT, metadata TEXT NOT NULL DEFAULT '{}', image_sha256 TEXT NOT NULL,"
            " image_ext TEXT NOT NULL, review TEXT NOT NULL DEFAULT 'unreviewed', reviewed_at REAL)"
        )
        conn.execute(
            "INSERT INTO flags (created_at, model, version, score, p_value, image_sha256, image_ext)"
            " VALUES (1.0, 'vae', 1, 2.0, 0.1, ?, 'png')",
            ("ab" * 32,),
        )
    with FlaggedStore(root) as store:
        assert store.count() == 1 and store.stats().bytes == 5
        assert store.read_image(1)[0] == b"12345"
        assert add(store, seed=1, idempotency_key="x").id == add(store, seed=2, idempotency_key="x").id


def test_the_settings_choose_the_backend_and_refuse_half_a_shared_store(tmp_path: Path) -> None:
    from service.flag_store import open_flag_store
    from service.flagged import FlaggedStore
    from service.settings import Settings

    settings = Settings(flagged_dir=tmp_path / "f", flagged_max_frames=5, flagged_max_image_bytes=20_000)
    with open_flag_store(settings) as store:
        assert isinstance(store, FlaggedStore) and store.retention == Retention(max_frames=5)
        assert store.max_image_bytes == 20_000
    with pytest.raises(ValueError, match="EDGECASE_FLAGGED_IMAGES is not"):
        open_flag_store(Settings(flagged_url="postgresql://db/edgecase"))
    with pytest.raises(ValueError, match="needs EDGECASE_FLAGGED_URL"):
        open_flag_store(Settings(flagged_images="s3://bucket/flagged/"))
    with pytest.raises(ValueError, match="at least"):
        Settings(flagged_max_image_bytes=100)
    env = Settings(flagged_images_options={"client_kwargs": {"endpoint_url": "http://minio:9000"}}).to_env()
    # `edgecase serve` hands settings to its workers as variables: the options survive as JSON
    assert json.loads(env["EDGECASE_FLAGGED_IMAGES_OPTIONS"]) == {
        "client_kwargs": {"endpoint_url": "http://minio:9000"}
    }


def test_the_stored_bytes_rule() -> None:
    from service.flag_rules import bounded_image

    frame = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    png = encode_png(frame)
    assert bounded_image(png, "png", 0, frame) == (png, "png")  # no cap: as sent
    assert bounded_image(png, "png", len(png), frame) == (png, "png")  # at the cap: as sent
    data, ext = bounded_image(b"GIF89a...", None, 0, frame)  # a format the store does not keep
    assert ext == "png" and np.array_equal(decode_frame(data), frame)  # the decoded frame, lossless
    data, ext = bounded_image(png, "png", 16_384, frame)
    shrunk = decode_frame(data)
    assert (
        ext == "png" and len(data) <= 16_384 and shrunk.shape[1] / shrunk.shape[0] == pytest.approx(1.5, 0.05)
    )
