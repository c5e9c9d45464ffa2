"""The embedded flagged-frame store: SQLite rows plus content-addressed image files in one folder.

The default backend of :class:`service.flag_store.FlagStore` (``edgecase serve``, the demo, one
machine). Every edge case the service (or batch scoring) flags is kept for review in two parts,
written in this order so that a row never points to a missing image:

1. the image bytes, content-addressed on disk (``root/images/<sha256[:2]>/<sha256>.<ext>``,
   :mod:`service.image_files`): complete under their real name or absent. Identical frames share
   one file; an orphan image left by a crash between the two steps is harmless;
2. one row per flag in SQLite (WAL journal, ``synchronous=FULL``): committed before ``add`` returns,
   so a flag that was acknowledged to a client survives a SIGKILL or a power cut. The commit checks,
   under SQLite's write lock, that each image is still there (retention may have deleted a shared
   image between the write and the commit) and records it in the ``images`` table (its size counts
   towards the retention's byte limit).

Thread-safe (one SQLite connection per thread) and safe across worker processes (WAL + a busy
timeout serialise writers; readers never block). The schema version is SQLite's ``user_version``;
stores written before it existed (version 1) are migrated on open. Reviewed flags are exported as a
labelled folder that ``edgecase train --data`` reads (:mod:`service.flagged_export`).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.flag_rules import (
    PreparedFlag,
    as_epoch,
    check_label,
    check_list_args,
    list_filters,
    prepare_flags,
)
from service.flag_store import (
    RETENTION_ORDER,
    REVIEW_LABELS,
    REVIEW_STATES,
    FlaggedNotFoundError,
    FlaggedRecord,
    FlagStore,
    ImageMissingError,
    NewFlag,
    Retention,
    ReviewLabel,
    ReviewState,
    StoreStats,
)
from service.image_files import ImageFiles

__all__ = [  # the record types live in service.flag_store; importing them from here keeps working
    "DB_FILE",
    "REVIEW_LABELS",
    "REVIEW_STATES",
    "FlaggedNotFoundError",
    "FlaggedRecord",
    "FlaggedStore",
    "NewFlag",
    "ReviewLabel",
    "ReviewState",
]

DB_FILE = "flagged.sqlite"
BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for another process's write lock before giving up (SQLite busy timeout)."""
SCHEMA_VERSION = 2
"""1: flags only (before retention); 2: + images (sizes, for retention) and flags.idempotency_key."""

_FLAGS_V1 = """
CREATE TABLE IF NOT EXISTS flags (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    score REAL NOT NULL,
    p_value REAL NOT NULL,
    client_key TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    image_sha256 TEXT NOT NULL,
    image_ext TEXT NOT NULL,
    review TEXT NOT NULL DEFAULT 'unreviewed'
        CHECK (review IN ('unreviewed', 'edge_case', 'normal')),
    reviewed_at REAL
)"""
_INDEXES_V1 = (
    "CREATE INDEX IF NOT EXISTS flags_model_version_created ON flags (model, version, created_at)",
    "CREATE INDEX IF NOT EXISTS flags_created ON flags (created_at)",
    "CREATE INDEX IF NOT EXISTS flags_review ON flags (review)",
)
_TO_V2 = (
    "ALTER TABLE flags ADD COLUMN idempotency_key TEXT",
    "CREATE UNIQUE INDEX IF NOT EXISTS flags_idempotency_key ON flags (idempotency_key)",
    "CREATE INDEX IF NOT EXISTS flags_image ON flags (image_sha256, image_ext)",
    """CREATE TABLE IF NOT EXISTS images (
        sha256 TEXT NOT NULL,
        ext TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (sha256, ext)
    )""",
)
_INSERT = (
    "INSERT INTO flags (created_at, model, version, score, p_value, client_key, metadata, image_sha256,"
    " image_ext, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
)
_LIVE_BYTES = (
    "(SELECT COALESCE(SUM(bytes), 0) FROM images WHERE EXISTS"
    " (SELECT 1 FROM flags WHERE flags.image_sha256 = images.sha256 AND flags.image_ext = images.ext))"
)
_UNREFERENCED = (
    "FROM images WHERE NOT EXISTS"
    " (SELECT 1 FROM flags WHERE flags.image_sha256 = images.sha256 AND flags.image_ext = images.ext)"
)
IO_THREADS = 8
"""Parallel image writes/fsyncs per store (fsync is disk-bound; overlapping them lets the disk merge)."""


@dataclass
class _Ticket:
    """Flags waiting for a group commit, and what the commit gave them."""

    flags: list[PreparedFlag]
    done: bool = False
    ids: list[int] = field(default_factory=list)
    existing: set[int] = field(default_factory=set)  # indices whose idempotency key was already stored
    created_at: float = 0.0
    error: BaseException | None = None


def _utc(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


class FlaggedStore(FlagStore):
    """Flagged frames on disk (content-addressed images) plus one SQLite row per flag.

    ``root`` holds ``images/`` and, unless ``db_path`` says otherwise, ``flagged.sqlite``.
    """

    def __init__(
        self, root: Path | str, db_path: Path | str | None = None, *, retention: Retention | None = None
    ) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.retention = retention or Retention()
        self.images = ImageFiles(self.root / "images")
        self.db_path = Path(db_path) if db_path is not None else self.root / DB_FILE
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._queue_lock = threading.Lock()  # guards _queued
        self._commit_lock = threading.Lock()  # one group commit at a time (per process)
        self._queued: list[_Ticket] = []
        self._pool_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._migrate()

    # -- connections and schema --------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 objects must not be shared between threads)."""
        if self._closed:
            raise RuntimeError(f"flagged store {self.root} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below), never implicit.
            conn = sqlite3.connect(
                self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: every commit is fsynced, so an acknowledged flag survives power loss, not only a crash.
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        # IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading a read.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        """Create the schema, or bring an older store's up to ``SCHEMA_VERSION``, in one transaction."""
        with self._transaction() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.db_path} has schema version {version}; this edgecase knows up to "
                    f"{SCHEMA_VERSION} (upgrade edgecase)"
                )
            if version == SCHEMA_VERSION:
                return
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(flags)")}
            conn.execute(_FLAGS_V1)
            for statement in _INDEXES_V1:
                conn.execute(statement)
            for statement in _TO_V2:
                if "ADD COLUMN" not in statement or "idempotency_key" not in columns:
                    conn.execute(statement)
            # A version-1 store: record the images its flags point to, with their sizes on disk.
            now = time.time()
            for row in conn.execute("SELECT DISTINCT image_sha256, image_ext FROM flags").fetchall():
                path = self.images.path(row[0], row[1])
                size = path.stat().st_size if path.is_file() else 0
                conn.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", (row[0], row[1], size, now))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close every thread's connection (the store cannot be used afterwards)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._connections_lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()

    def __enter__(self) -> FlaggedStore:
        return self

    # -- writing -----------------------------------------------------------------------------

    def add_many(self, flags: Sequence[NewFlag]) -> list[FlaggedRecord]:
        """Store several flags: images durable first, then their rows in one (group) commit."""
        prepared = prepare_flags(flags, self.max_image_bytes)
        # Images first: a row committed below must never point to a file that is not durable yet.
        # Several images are written (and fsynced) in parallel: fsync waits on the disk, not the CPU.
        self.images.put_many([(p.data, p.ext) for p in prepared], self._map)
        ticket = self._commit(prepared)
        records = []
        for index, (flag_id, p) in enumerate(zip(ticket.ids, prepared, strict=True)):
            if index in ticket.existing:  # stored before under this idempotency key: that flag
                records.append(self.get(flag_id))
                continue
            records.append(
                FlaggedRecord(
                    id=flag_id,
                    created_at=datetime.fromtimestamp(ticket.created_at, UTC),
                    model=p.flag.model,
                    version=int(p.flag.version),
                    score=float(p.flag.score),
                    p_value=float(p.flag.p_value),
                    key=p.flag.key,
                    metadata=json.loads(p.metadata_json),
                    image_sha256=p.sha256,
                    image_ext=p.ext,
                    review="unreviewed",
                    reviewed_at=None,
                )
            )
        return records

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, on the store's small I/O pool when there is more than one."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="flagged-io")
        return list(self._pool.map(fn, items))

    def _commit(self, flags: list[PreparedFlag]) -> _Ticket:
        """Insert rows durably, sharing one commit (one WAL fsync) with whatever other threads are adding.

        Group commit: a thread that finds no commit running commits every row queued so far; threads
        arriving meanwhile queue theirs for the next commit.
        """
        ticket = _Ticket(flags)
        with self._queue_lock:
            self._queued.append(ticket)
        with self._commit_lock:
            if not ticket.done:  # nobody committed our rows while we waited: lead the next group
                with self._queue_lock:
                    group, self._queued = self._queued, []
                now = time.time()
                try:
                    with self._transaction() as conn:
                        for member in group:
                            self._insert(conn, member, now)
                except BaseException as exc:
                    for member in group:
                        member.error = exc
                    raise
                finally:
                    for member in group:
                        member.done = True
        if ticket.error is not None:
            raise ticket.error
        return ticket

    def _insert(self, conn: sqlite3.Connection, ticket: _Ticket, now: float) -> None:
        """One ticket's rows, inside the group's transaction (SQLite's write lock is held)."""
        ticket.ids, ticket.existing, ticket.created_at = [], set(), now
        for index, p in enumerate(ticket.flags):
            if not self.images.path(p.sha256, p.ext).is_file():
                # Retention deleted this (shared) image after we wrote it: write it again. Images are
                # only deleted under the write lock we hold now, so it stays until our commit.
                self.images.put_many([(p.data, p.ext)])
            conn.execute(
                "INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", (p.sha256, p.ext, len(p.data), now)
            )
            flag = p.flag
            row = conn.execute(
                _INSERT,
                (
                    now,
                    flag.model,
                    int(flag.version),
                    float(flag.score),
                    float(flag.p_value),
                    flag.key,
                    p.metadata_json,
                    p.sha256,
                    p.ext,
                    flag.idempotency_key,
                ),
            ).fetchone()
            if row is None:  # the idempotency key is taken: the flag is already stored
                row = conn.execute(
                    "SELECT id FROM flags WHERE idempotency_key = ?", (flag.idempotency_key,)
                ).fetchone()
                ticket.existing.add(index)
            ticket.ids.append(int(row[0]))

    def review(self, flag_id: int, label: str) -> FlaggedRecord:
        """Record a reviewer's verdict (``edge_case`` or ``normal``); reviewing again overwrites it."""
        check_label(label)
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE flags SET review = ?, reviewed_at = ? WHERE id = ?", (label, time.time(), flag_id)
            )
            if cursor.rowcount == 0:
                raise FlaggedNotFoundError(flag_id)
        return self.get(flag_id)

    # -- reading -----------------------------------------------------------------------------

    @staticmethod
    def _record(row: sqlite3.Row) -> FlaggedRecord:
        return FlaggedRecord(
            id=row["id"],
            created_at=datetime.fromtimestamp(row["created_at"], UTC),
            model=row["model"],
            version=row["version"],
            score=row["score"],
            p_value=row["p_value"],
            key=row["client_key"],
            metadata=json.loads(row["metadata"]),
            image_sha256=row["image_sha256"],
            image_ext=row["image_ext"],
            review=row["review"],
            reviewed_at=_utc(row["reviewed_at"]),
        )

    def get(self, flag_id: int) -> FlaggedRecord:
        """One flag by id; ``FlaggedNotFoundError`` if there is none."""
        row = self._connection().execute("SELECT * FROM flags WHERE id = ?", (flag_id,)).fetchone()
        if row is None:
            raise FlaggedNotFoundError(flag_id)
        return self._record(row)

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
        """Flags matching every given filter (``since`` inclusive, ``until`` exclusive), a page of them.

        Returns ``(records, total)`` where ``total`` counts every match, not just this page.
        """
        check_list_args(review, limit, offset)
        clauses, params = list_filters("?", as_epoch, model, version, since, until, review)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        conn = self._connection()
        # One read transaction, so the page and the total come from the same snapshot.
        conn.execute("BEGIN")
        try:
            total = conn.execute(f"SELECT COUNT(*) FROM flags{where}", params).fetchone()[0]
            rows = conn.execute(
                f"SELECT * FROM flags{where} ORDER BY id {order} LIMIT ? OFFSET ?", [*params, limit, offset]
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return [self._record(row) for row in rows], int(total)

    def image_path(self, flag_id: int) -> Path:
        """The file holding a flag's image; ``FlaggedNotFoundError`` for an unknown id."""
        record = self.get(flag_id)
        return self.images.path(record.image_sha256, record.image_ext)

    def image_of(self, record: FlaggedRecord) -> bytes:
        try:
            return self.images.read(record.image_sha256, record.image_ext)
        except FileNotFoundError as exc:
            raise ImageMissingError(
                f"the image of flag {record.id} is missing from the store ({record.image_sha256})"
            ) from exc

    def count(self) -> int:
        """Number of flags (rows), however many distinct images they share."""
        return int(self._connection().execute("SELECT COUNT(*) FROM flags").fetchone()[0])

    def stats(self) -> StoreStats:
        row = (
            self._connection()
            .execute(
                "SELECT (SELECT COUNT(*) FROM flags), (SELECT COUNT(*) FROM images),"
                " (SELECT COALESCE(SUM(bytes), 0) FROM images)"
            )
            .fetchone()
        )
        return StoreStats(frames=int(row[0]), images=int(row[1]), bytes=int(row[2]))

    # -- retention ---------------------------------------------------------------------------

    def _delete_excess(self) -> int:
        with self._transaction() as conn:  # the write lock: one pruner at a time, across processes
            frames, live_bytes = conn.execute(
                f"SELECT (SELECT COUNT(*) FROM flags), {_LIVE_BYTES}"
            ).fetchone()
            excess = self.retention.excess(StoreStats(int(frames), 0, int(live_bytes)))
            if excess == 0:
                return 0
            cursor = conn.execute(
                f"DELETE FROM flags WHERE id IN (SELECT id FROM flags {RETENTION_ORDER} LIMIT ?)", (excess,)
            )
            return int(cursor.rowcount)

    def collect_images(self) -> int:
        # Under the write lock: no commit can start pointing to an image while we delete it. A crash
        # after the unlink and before the commit leaves the row, and the next collection retries.
        if self._connection().execute(f"SELECT EXISTS (SELECT 1 {_UNREFERENCED})").fetchone()[0] == 0:
            return 0  # nothing to collect: do not take the write lock
        with self._transaction() as conn:
            gone = conn.execute(f"SELECT sha256, ext {_UNREFERENCED}").fetchall()
            for sha256, ext in gone:
                self.images.delete(sha256, ext)
            conn.execute(f"DELETE {_UNREFERENCED}")
        return len(gone)
