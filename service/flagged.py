"""The flagged-frame store: every edge case the service (or batch scoring) flags, kept for review.

Two parts, written in this order so that a row never points to a missing image:

1. the image bytes, content-addressed on disk (``root/images/<sha256[:2]>/<sha256>.<ext>``,
   :mod:`service.image_files`): complete under their real name or absent. Identical frames share
   one file; an orphan image left by a crash between the two steps is harmless;
2. one row per flag in SQLite (WAL journal, ``synchronous=FULL``): committed before ``add`` returns,
   so a flag that was acknowledged to a client survives a SIGKILL or a power cut.

Thread-safe (one SQLite connection per thread) and safe across worker processes (WAL + a busy
timeout serialise writers; readers never block). Reviewed flags are exported as a labelled folder
that ``edgecase train --data`` reads (:mod:`service.flagged_export`).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from service.image_files import MEDIA_TYPES, ImageFiles, fsync_dir, normalise_ext

ReviewState = Literal["unreviewed", "edge_case", "normal"]
ReviewLabel = Literal["edge_case", "normal"]
REVIEW_STATES: tuple[str, ...] = get_args(ReviewState)
REVIEW_LABELS: tuple[str, ...] = get_args(ReviewLabel)

DB_FILE = "flagged.sqlite"
BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for another process's write lock before giving up (SQLite busy timeout)."""

_SCHEMA = """
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
);
CREATE INDEX IF NOT EXISTS flags_model_version_created ON flags (model, version, created_at);
CREATE INDEX IF NOT EXISTS flags_created ON flags (created_at);
CREATE INDEX IF NOT EXISTS flags_review ON flags (review);
-- Batch scoring's flags, at most once per (model, version, source shard, key): a rerun adds nothing.
CREATE TABLE IF NOT EXISTS batch_flags (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    source TEXT NOT NULL,
    client_key TEXT NOT NULL,
    flag_id INTEGER NOT NULL REFERENCES flags (id),
    PRIMARY KEY (model, version, source, client_key)
);
"""


_INSERT = (
    "INSERT INTO flags (created_at, model, version, score, p_value, client_key, metadata, image_sha256,"
    " image_ext) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
IO_THREADS = 8
"""Parallel image writes/fsyncs per store (fsync is disk-bound; overlapping them lets the disk merge)."""


@dataclass
class _Ticket:
    """Rows waiting for a group commit, and what the commit gave them."""

    rows: list[tuple[Any, ...]]
    done: bool = False
    ids: list[int] = field(default_factory=list)
    created_at: float = 0.0
    error: BaseException | None = None


class FlaggedNotFoundError(KeyError):
    """No flag with this id (the routes answer 404)."""

    def __init__(self, flag_id: int) -> None:
        super().__init__(flag_id)
        self.flag_id = flag_id

    def __str__(self) -> str:
        return f"no flagged frame with id {self.flag_id}"


@dataclass(frozen=True)
class NewFlag:
    """One frame to flag; what ``FlaggedStore.add_many`` takes (``add`` takes the same as keywords)."""

    image: bytes
    model: str
    version: int
    score: float
    p_value: float
    key: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    ext: str = "png"


@dataclass(frozen=True)
class FlaggedRecord:
    """One stored flag. ``created_at``/``reviewed_at`` are timezone-aware UTC datetimes."""

    id: int
    created_at: datetime
    model: str
    version: int
    score: float
    p_value: float
    key: str | None
    metadata: dict[str, Any]
    image_sha256: str
    image_ext: str
    review: ReviewState
    reviewed_at: datetime | None

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.image_ext]


def _utc(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _epoch(when: datetime | float | None) -> float | None:
    """Datetimes without a timezone are taken as UTC (what the API documents)."""
    if when is None or isinstance(when, int | float):
        return when
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


class FlaggedStore:
    """Flagged frames on disk (content-addressed images) plus one SQLite row per flag.

    ``root`` holds ``images/`` and, unless ``db_path`` says otherwise, ``flagged.sqlite``.
    """

    def __init__(self, root: Path | str, db_path: Path | str | None = None) -> None:
        self.root = Path(root)
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
        # executescript runs each statement in its own implicit transaction; all are idempotent.
        self._connection().executescript(_SCHEMA)

    # -- connections -------------------------------------------------------------------------

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

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------

    def add(
        self,
        image_bytes: bytes,
        *,
        model: str,
        version: int,
        score: float,
        p_value: float,
        key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        ext: str = "png",
    ) -> FlaggedRecord:
        """Store one flagged frame; returns only once both the image and its row are durable."""
        flag = NewFlag(image_bytes, model, version, score, p_value, key, metadata or {}, ext)
        return self.add_many([flag])[0]

    def add_many(self, flags: Sequence[NewFlag]) -> list[FlaggedRecord]:
        """Store several flags: images durable first, then their rows in one (group) commit."""
        prepared = []
        for flag in flags:
            data = bytes(flag.image)
            if not data:
                raise ValueError("a flagged frame needs image bytes, got 0 bytes")
            if not flag.model:
                raise ValueError("a flagged frame needs a model name")
            if not (math.isfinite(flag.score) and math.isfinite(flag.p_value)):
                # A NaN/inf score is a broken model (the service answers 500), not an edge case to review.
                raise ValueError(f"score and p-value must be finite, got {flag.score} and {flag.p_value}")
            try:
                metadata_json = json.dumps(dict(flag.metadata), sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata must be JSON-serialisable: {exc}") from exc
            prepared.append((flag, data, normalise_ext(flag.ext), metadata_json))
        # Images first: a row committed below must never point to a file that is not durable yet.
        # Several images are written (and fsynced) in parallel: fsync waits on the disk, not the CPU.
        written = self._map(lambda item: self.images.write(item[1], item[2]), prepared)
        self._map(fsync_dir, sorted({folder for _, folder in written}))  # renames durable before rows
        rows = [
            (flag, sha256, ext, metadata_json)
            for (flag, _, ext, metadata_json), (sha256, _) in zip(prepared, written, strict=True)
        ]
        ids, now = self._commit_rows(
            [
                (
                    flag.model,
                    int(flag.version),
                    float(flag.score),
                    float(flag.p_value),
                    flag.key,
                    meta,
                    sha,
                    ext,
                )
                for flag, sha, ext, meta in rows
            ]
        )
        return [
            FlaggedRecord(
                id=flag_id,
                created_at=datetime.fromtimestamp(now, UTC),
                model=flag.model,
                version=int(flag.version),
                score=float(flag.score),
                p_value=float(flag.p_value),
                key=flag.key,
                metadata=json.loads(metadata_json),
                image_sha256=sha256,
                image_ext=ext,
                review="unreviewed",
                reviewed_at=None,
            )
            for flag_id, (flag, sha256, ext, metadata_json) in zip(ids, rows, strict=True)
        ]

    def add_many_once(self, flags: Sequence[NewFlag], sources: Sequence[str]) -> list[FlaggedRecord]:
        """Store the flags whose (model, version, source, key) is not in the store yet; return those added.

        Batch scoring's idempotent write: a rerun of a killed run offers the same flags again and
        nothing is duplicated. Check and insert share one transaction (INSERT OR IGNORE on the
        ``batch_flags`` key), so two writers or a crash cannot let a duplicate through. Every flag
        needs a key; images are written first, as in ``add_many`` (an orphan image is harmless).
        """
        if len(flags) != len(sources):
            raise ValueError(f"{len(flags)} flags but {len(sources)} sources")
        if any(flag.key is None for flag in flags):
            raise ValueError("add_many_once needs a key for every flag")
        for flag in flags:
            if not (flag.image and flag.model and math.isfinite(flag.score) and math.isfinite(flag.p_value)):
                raise ValueError(f"flag {flag.key!r}: needs image bytes, a model and a finite score")
        metas = [json.dumps(dict(flag.metadata), sort_keys=True, allow_nan=False) for flag in flags]
        written = self._map(lambda flag: self.images.write(bytes(flag.image), normalise_ext(flag.ext)), flags)
        self._map(fsync_dir, sorted({folder for _, folder in written}))
        added: list[FlaggedRecord] = []
        now = time.time()
        with self._transaction() as conn:
            for flag, source, meta, (sha256, _) in zip(flags, sources, metas, written, strict=True):
                claim = conn.execute(
                    "INSERT OR IGNORE INTO batch_flags (model, version, source, client_key, flag_id)"
                    " VALUES (?, ?, ?, ?, 0)",
                    (flag.model, int(flag.version), source, flag.key),
                )
                if claim.rowcount == 0:
                    continue  # flagged by an earlier run
                ext = normalise_ext(flag.ext)
                row = (now, flag.model, int(flag.version), float(flag.score), float(flag.p_value))
                flag_id = int(conn.execute(_INSERT, (*row, flag.key, meta, sha256, ext)).lastrowid or 0)
                conn.execute(
                    "UPDATE batch_flags SET flag_id = ? WHERE model = ? AND version = ? AND source = ?"
                    " AND client_key = ?",
                    (flag_id, flag.model, int(flag.version), source, flag.key),
                )
                added.append(
                    FlaggedRecord(
                        flag_id, datetime.fromtimestamp(now, UTC), flag.model, int(flag.version),
                        float(flag.score), float(flag.p_value), flag.key, json.loads(meta), sha256, ext,
                        "unreviewed", None,
                    )
                )  # fmt: skip
        return added

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, on the store's small I/O pool when there is more than one."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="flagged-io")
        return list(self._pool.map(fn, items))

    def _commit_rows(self, rows: list[tuple[Any, ...]]) -> tuple[list[int], float]:
        """Insert rows durably, sharing one commit (one WAL fsync) with whatever other threads are adding.

        Group commit: a thread that finds no commit running commits every row queued so far; threads
        arriving meanwhile queue theirs for the next commit. Returns (ids in order, created_at).
        """
        ticket = _Ticket(rows)
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
                            member.ids = [
                                int(conn.execute(_INSERT, (now, *row)).lastrowid or 0) for row in member.rows
                            ]
                            member.created_at = now
                except BaseException as exc:
                    for member in group:
                        member.error = exc
                    raise
                finally:
                    for member in group:
                        member.done = True
        if ticket.error is not None:
            raise ticket.error
        return ticket.ids, ticket.created_at

    def review(self, flag_id: int, label: str) -> FlaggedRecord:
        """Record a reviewer's verdict (``edge_case`` or ``normal``); reviewing again overwrites it."""
        if label not in REVIEW_LABELS:
            raise ValueError(f"review label must be one of {', '.join(REVIEW_LABELS)}, got {label!r}")
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
    ) -> tuple[list[FlaggedRecord], int]:
        """Flags matching every given filter (``since`` inclusive, ``until`` exclusive), a page of them.

        Returns ``(records, total)`` where ``total`` counts every match, not just this page.
        """
        if review is not None and review not in REVIEW_STATES:
            raise ValueError(f"review must be one of {', '.join(REVIEW_STATES)}, got {review!r}")
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, got limit={limit} offset={offset}")
        clauses, params = self._filters(model, version, since, until, review)
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

    @staticmethod
    def _filters(
        model: str | None,
        version: int | None,
        since: datetime | float | None,
        until: datetime | float | None,
        review: str | None,
    ) -> tuple[builtins.list[str], builtins.list[Any]]:  # `list` is also a method of this class
        clauses: builtins.list[str] = []
        params: builtins.list[Any] = []
        for clause, value in (
            ("model = ?", model),
            ("version = ?", version),
            ("created_at >= ?", _epoch(since)),
            ("created_at < ?", _epoch(until)),
            ("review = ?", review),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return clauses, params

    def image_path(self, flag_id: int) -> Path:
        """The file holding a flag's image; ``FlaggedNotFoundError`` for an unknown id."""
        record = self.get(flag_id)
        return self.images.path(record.image_sha256, record.image_ext)

    def read_image(self, flag_id: int) -> tuple[bytes, str]:
        """A flag's image bytes and media type."""
        record = self.get(flag_id)
        return self.images.path(record.image_sha256, record.image_ext).read_bytes(), record.media_type

    def count(self) -> int:
        """Number of flags (rows), however many distinct images they share."""
        return int(self._connection().execute("SELECT COUNT(*) FROM flags").fetchone()[0])

    # -- export ------------------------------------------------------------------------------

    def export(self, review: str, out: Path | str, *, overwrite: bool = False) -> int:
        """Write the flags in one review state as a labelled folder for ``edgecase train --data``
        (:func:`service.flagged_export.export_flags`); returns the frames written."""
        from service.flagged_export import export_flags

        return export_flags(self, review, out, overwrite=overwrite)
