"""The shared flagged-frame store: rows in PostgreSQL, images in an object store (or a shared folder).

Many replicas, one review queue. The write path keeps the embedded store's guarantee, that a flag is
acknowledged only once its image and its row are durable:

1. one transaction per ``add_many`` takes a *shared* advisory lock (``GC_LOCK``), PUTs the images
   (content-addressed, so a retry rewrites the same object), inserts their ``flag_images`` rows and
   the flags, and commits; rows become visible only at the commit, after the images are durable;
2. retention deletes flags (committed), then collects images no flag points to under the *exclusive*
   ``GC_LOCK``, deleting the objects before its commit: no add is ever between "image written" and
   "row committed" while an image is deleted, and a crash mid-collection leaves the image row, so the
   next collection retries (an add PUTs its objects every time, and writes a file whenever it is
   missing, so it also restores an image such a crash deleted).

The schema is created and migrated at startup by whichever replica gets there first: migrations run
under a transaction-level advisory lock (``MIGRATION_LOCK``), so replicas starting together wait for
one another instead of racing, and ``flags_schema_version`` records what has been applied.
Connections come from a psycopg 3 pool (``flagged_pool_size`` per worker process).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from service.flag_rules import (
    as_epoch,
    check_label,
    check_list_args,
    list_filters,
    prepare_flags,
)
from service.flag_store import (
    RETENTION_ORDER,
    FlaggedNotFoundError,
    FlaggedRecord,
    FlagStore,
    ImageMissingError,
    NewFlag,
    Retention,
    StoreStats,
)
from service.image_files import ImageFiles
from service.object_images import ObjectImages, is_object_url

MIGRATION_LOCK = 0x6564_6765_6361_7365  # "edgecase": one advisory lock id for schema migrations
GC_LOCK = MIGRATION_LOCK + 1  # shared by adds, exclusive for deleting images
PRUNE_LOCK = MIGRATION_LOCK + 2  # one retention round at a time across replicas
IO_THREADS = 8
"""Parallel image PUTs per store (each waits on the network, not the CPU)."""

SCHEMA_VERSION = 1
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE flag_images (
            sha256 text NOT NULL,
            ext text NOT NULL,
            bytes bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (sha256, ext)
        )""",
        """CREATE TABLE flags (
            id bigserial PRIMARY KEY,
            created_at timestamptz NOT NULL DEFAULT now(),
            model text NOT NULL,
            version bigint NOT NULL,
            score double precision NOT NULL,
            p_value double precision NOT NULL,
            client_key text,
            metadata jsonb NOT NULL DEFAULT '{}',
            image_sha256 text NOT NULL,
            image_ext text NOT NULL,
            review text NOT NULL DEFAULT 'unreviewed' CHECK (review IN ('unreviewed', 'edge_case', 'normal')),
            reviewed_at timestamptz,
            idempotency_key text UNIQUE,
            FOREIGN KEY (image_sha256, image_ext) REFERENCES flag_images (sha256, ext)
        )""",
        "CREATE INDEX flags_model_version_created ON flags (model, version, created_at)",
        "CREATE INDEX flags_created ON flags (created_at)",
        "CREATE INDEX flags_review ON flags (review)",
        "CREATE INDEX flags_image ON flags (image_sha256, image_ext)",
        "CREATE INDEX flags_retention ON flags ((review <> 'unreviewed'), created_at, id)",
    ),
}

_COLUMNS = (
    "id, created_at, model, version, score, p_value, client_key, metadata, image_sha256, image_ext,"
    " review, reviewed_at"
)
_INSERT = (
    "INSERT INTO flags (model, version, score, p_value, client_key, metadata, image_sha256, image_ext,"
    " idempotency_key) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)"
    f" ON CONFLICT (idempotency_key) DO NOTHING RETURNING {_COLUMNS}"
)
_REFERENCED = (
    "EXISTS (SELECT 1 FROM flags WHERE flags.image_sha256 = flag_images.sha256"
    " AND flags.image_ext = flag_images.ext)"
)
_LIVE_BYTES = f"(SELECT COALESCE(SUM(bytes), 0) FROM flag_images WHERE {_REFERENCED})"


def redact(url: str) -> str:
    """A database URL without its password (for logs and export provenance)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresFlagStore(FlagStore):
    """Flags in PostgreSQL (``url``), images under ``images`` (``s3://...`` or a shared folder)."""

    def __init__(
        self,
        url: str,
        images: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        retention: Retention | None = None,
        pool_size: int = 8,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.location = f"{redact(url)} + {images}"
        self.retention = retention or Retention()
        self.images: ObjectImages | ImageFiles
        if is_object_url(images):
            self.images = ObjectImages(images, storage_options)
        else:
            from pathlib import Path

            self.images = ImageFiles(Path(images.removeprefix("file://")))
        self._pool: ConnectionPool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=True,
            check=ConnectionPool.check_connection,  # a restarted database: reconnect, do not fail a flag
            name="edgecase-flagged",
            timeout=connect_timeout_s,
        )
        self._io_lock = threading.Lock()
        self._io: ThreadPoolExecutor | None = None
        try:
            self._pool.wait(timeout=connect_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise RuntimeError(
                f"cannot reach the flagged store's database {redact(url)} within {connect_timeout_s:.0f} s"
            ) from exc
        try:
            self.migrate()
        except BaseException:
            self._pool.close()
            raise

    # -- schema ------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION`` (one replica at a time); returns the version found."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS flags_schema_version ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM flags_schema_version").fetchone()
            found = int(row[0]) if row else 0
            if found > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the flagged store's schema is version {found}; this edgecase knows up to "
                    f"{SCHEMA_VERSION} (upgrade edgecase before starting it on this database)"
                )
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO flags_schema_version (version) VALUES (%s)", (version,))
        return found

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        with self._io_lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="flagged-put")
        return list(self._io.map(fn, items))

    def close(self) -> None:
        self._pool.close()
        if self._io is not None:
            self._io.shutdown(wait=True)

    # -- writing -----------------------------------------------------------------------------

    def add_many(self, flags: Sequence[NewFlag]) -> list[FlaggedRecord]:
        prepared = prepare_flags(flags, self.max_image_bytes)
        if not prepared:
            return []
        images = {(p.sha256, p.ext): p for p in prepared}
        records: list[FlaggedRecord | None] = []
        with self._transaction() as conn:
            # Shared: adds run side by side; image collection (exclusive) waits for them, and they for it.
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (GC_LOCK,))
            self.images.put_many([(p.data, p.ext) for p in images.values()], self._map)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO flag_images (sha256, ext, bytes) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    [(p.sha256, p.ext, len(p.data)) for p in images.values()],
                )
                cur.executemany(
                    _INSERT,
                    [
                        (
                            p.flag.model,
                            int(p.flag.version),
                            float(p.flag.score),
                            float(p.flag.p_value),
                            p.flag.key,
                            p.metadata_json,
                            p.sha256,
                            p.ext,
                            p.flag.idempotency_key,
                        )
                        for p in prepared
                    ],
                    returning=True,
                )
                for _ in cur.results():
                    row = cur.fetchone()
                    records.append(None if row is None else _record(row))
                taken = [p.flag.idempotency_key for p, r in zip(prepared, records, strict=True) if r is None]
                if taken:  # already stored under these idempotency keys: return those flags
                    cur.execute(
                        f"SELECT {_COLUMNS}, idempotency_key FROM flags WHERE idempotency_key = ANY(%s)",
                        (taken,),
                    )
                    existing = {row[-1]: _record(row[:-1]) for row in cur.fetchall()}
                    records = [
                        r if r is not None else existing[p.flag.idempotency_key]
                        for p, r in zip(prepared, records, strict=True)
                    ]
        return [r for r in records if r is not None]

    def review(self, flag_id: int, label: str) -> FlaggedRecord:
        check_label(label)
        with self._transaction() as conn:
            row = conn.execute(
                f"UPDATE flags SET review = %s, reviewed_at = now() WHERE id = %s RETURNING {_COLUMNS}",
                (label, flag_id),
            ).fetchone()
        if row is None:
            raise FlaggedNotFoundError(flag_id)
        return _record(row)

    # -- reading -----------------------------------------------------------------------------

    def get(self, flag_id: int) -> FlaggedRecord:
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM flags WHERE id = %s", (flag_id,)).fetchone()
        if row is None:
            raise FlaggedNotFoundError(flag_id)
        return _record(row)

    def list(
        self,
        model: str | None = None,
        version: int | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        review: str | None = None,
        limit: int = 50,
        offset: int = 0,
        newest_first: bool = True,
    ) -> tuple[builtins.list[FlaggedRecord], int]:
        check_list_args(review, limit, offset)
        clauses, params = list_filters("%s", _datetime, model, version, since, until, review)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        with self._transaction() as conn:
            # One snapshot for the page and the total.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            total_row = conn.execute(f"SELECT COUNT(*) FROM flags{where}", params).fetchone()
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM flags{where} ORDER BY id {order} LIMIT %s OFFSET %s",
                [*params, limit, offset],
            ).fetchall()
        return [_record(row) for row in rows], int(total_row[0]) if total_row else 0

    def image_of(self, record: FlaggedRecord) -> bytes:
        try:
            return self.images.read(record.image_sha256, record.image_ext)
        except FileNotFoundError as exc:
            raise ImageMissingError(
                f"the image of flag {record.id} is missing from {self.images.location} "
                f"({record.image_sha256})"
            ) from exc

    def count(self) -> int:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT COUNT(*) FROM flags").fetchone()
        return int(row[0]) if row else 0

    def stats(self) -> StoreStats:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT (SELECT COUNT(*) FROM flags), (SELECT COUNT(*) FROM flag_images),"
                " (SELECT COALESCE(SUM(bytes), 0) FROM flag_images)"
            ).fetchone()
        assert row is not None
        return StoreStats(frames=int(row[0]), images=int(row[1]), bytes=int(row[2]))

    # -- retention ---------------------------------------------------------------------------

    def _delete_excess(self) -> int:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRUNE_LOCK,))
            row = conn.execute(f"SELECT (SELECT COUNT(*) FROM flags), {_LIVE_BYTES}").fetchone()
            assert row is not None
            excess = self.retention.excess(StoreStats(int(row[0]), 0, int(row[1])))
            if excess == 0:
                return 0
            cursor = conn.execute(
                f"DELETE FROM flags WHERE id IN (SELECT id FROM flags {RETENTION_ORDER} LIMIT %s)",
                (excess,),
            )
            return int(cursor.rowcount)

    def collect_images(self) -> int:
        with self._pool.connection() as conn:
            row = conn.execute(
                f"SELECT EXISTS (SELECT 1 FROM flag_images WHERE NOT {_REFERENCED})"
            ).fetchone()
        if not row or not row[0]:
            return 0  # nothing to collect: do not hold up the adds
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (GC_LOCK,))
            gone = conn.execute(
                f"DELETE FROM flag_images WHERE NOT {_REFERENCED} RETURNING sha256, ext"
            ).fetchall()
            # Before the commit: a crash here leaves the rows (and a retry), never a row without its image.
            self._map(lambda item: self.images.delete(item[0], item[1]), gone)
        return len(gone)


def _datetime(when: datetime | float | None) -> datetime | None:
    epoch = as_epoch(when)
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _record(row: Sequence[Any]) -> FlaggedRecord:
    metadata = row[7]
    return FlaggedRecord(
        id=int(row[0]),
        created_at=row[1].astimezone(UTC),
        model=row[2],
        version=int(row[3]),
        score=float(row[4]),
        p_value=float(row[5]),
        key=row[6],
        metadata=json.loads(metadata) if isinstance(metadata, str) else dict(metadata),
        image_sha256=row[8],
        image_ext=row[9],
        review=row[10],
        reviewed_at=None if row[11] is None else row[11].astimezone(UTC),
    )
