"""What every flagged-frame store promises, whatever holds its rows and its image bytes.

Two backends implement :class:`FlagStore`:

- :class:`service.flagged.FlaggedStore`, the embedded default: rows in SQLite and images as files
  under one folder (one machine, any number of worker processes);
- :class:`service.flagged_postgres.PostgresFlagStore`, the shared one: rows in PostgreSQL and images
  in an object store through fsspec (``s3://bucket/prefix/``) or a shared folder, so many replicas
  keep one review queue.

Both keep the same guarantee: ``add_many`` returns only once every image *and* every row is durable,
images are content-addressed (sha256), so a retried add writes the same object, and a flag carrying an
``idempotency_key`` is stored once however often it is added. Both keep what they store bounded: a
retention (:class:`Retention`, most frames and most bytes; the oldest unreviewed flags go first) that
``prune`` applies, and ``stats`` for the size gauges. :func:`open_flag_store` picks the backend from the
settings.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from service.image_files import MEDIA_TYPES

if TYPE_CHECKING:
    from service.settings import Settings

ReviewState = Literal["unreviewed", "edge_case", "normal"]
ReviewLabel = Literal["edge_case", "normal"]
REVIEW_STATES: tuple[str, ...] = get_args(ReviewState)
REVIEW_LABELS: tuple[str, ...] = get_args(ReviewLabel)

PRUNE_ROUNDS = 50
"""Most measure-then-delete rounds one ``prune`` runs (shared images make freed bytes a guess)."""
RETENTION_ORDER = "ORDER BY review <> 'unreviewed', created_at, id"
"""Which flags retention deletes first: unreviewed before reviewed, then oldest first (both backends)."""


class FlaggedNotFoundError(KeyError):
    """No flag with this id (the routes answer 404)."""

    def __init__(self, flag_id: int) -> None:
        super().__init__(flag_id)
        self.flag_id = flag_id

    def __str__(self) -> str:
        return f"no flagged frame with id {self.flag_id}"


class ImageMissingError(FileNotFoundError):
    """A flag's row exists but its image does not (someone deleted it under the store)."""


@dataclass(frozen=True)
class NewFlag:
    """One frame to flag; what ``FlagStore.add_many`` takes (``add`` takes the same as keywords).

    ``idempotency_key`` (optional, unique in the store): adding a flag whose key is already stored
    returns the stored flag instead of a new one (batch scoring uses model/version/shard/frame key).
    """

    image: bytes
    model: str
    version: int
    score: float
    p_value: float
    key: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    ext: str = "png"
    idempotency_key: str | None = None


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


@dataclass(frozen=True)
class Retention:
    """How much a store keeps: most flags and most image bytes; 0 means no limit."""

    max_frames: int = 0
    max_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_frames < 0 or self.max_bytes < 0:
            raise ValueError(f"retention limits must be >= 0, got {self.max_frames} and {self.max_bytes}")

    @property
    def bounded(self) -> bool:
        return self.max_frames > 0 or self.max_bytes > 0

    def excess(self, stats: StoreStats) -> int:
        """Flags to delete so ``stats`` fits (a guess for bytes: freed bytes depend on sharing)."""
        over_frames = max(0, stats.frames - self.max_frames) if self.max_frames else 0
        over_rows_for_bytes = 0
        if self.max_bytes and stats.bytes > self.max_bytes and stats.frames:
            per_flag = max(1.0, stats.bytes / stats.frames)
            over_rows_for_bytes = math.ceil((stats.bytes - self.max_bytes) / per_flag)
        return min(stats.frames, max(over_frames, over_rows_for_bytes))


@dataclass(frozen=True)
class StoreStats:
    """What a store holds: flags (rows), distinct images, and the images' bytes."""

    frames: int
    images: int
    bytes: int


class FlagStore(abc.ABC):
    """The flagged-frame store's interface; backends implement the abstract methods."""

    location: str
    """Where the store lives, for messages and export provenance (never holds a password)."""
    retention: Retention
    max_image_bytes: int = 0
    """Images over this size are re-encoded to fit before they are stored (0 = no cap)."""

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
        idempotency_key: str | None = None,
    ) -> FlaggedRecord:
        """Store one flagged frame; returns only once both the image and its row are durable."""
        flag = NewFlag(image_bytes, model, version, score, p_value, key, metadata or {}, ext, idempotency_key)
        return self.add_many([flag])[0]

    @abc.abstractmethod
    def add_many(self, flags: Sequence[NewFlag]) -> list[FlaggedRecord]:
        """Store several flags, images durable before rows; a known idempotency key returns its flag."""

    @abc.abstractmethod
    def review(self, flag_id: int, label: str) -> FlaggedRecord:
        """Record a reviewer's verdict (``edge_case`` or ``normal``); reviewing again overwrites it."""

    # -- reading -----------------------------------------------------------------------------

    @abc.abstractmethod
    def get(self, flag_id: int) -> FlaggedRecord:
        """One flag by id; ``FlaggedNotFoundError`` if there is none."""

    @abc.abstractmethod
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
        """Flags matching every given filter (``since`` inclusive, ``until`` exclusive), one page.

        Returns ``(records, total)`` where ``total`` counts every match, not just this page.
        """

    @abc.abstractmethod
    def image_of(self, record: FlaggedRecord) -> bytes:
        """A stored flag's image bytes; ``ImageMissingError`` if they are gone."""

    def read_image(self, flag_id: int) -> tuple[bytes, str]:
        """A flag's image bytes and media type."""
        record = self.get(flag_id)
        return self.image_of(record), record.media_type

    @abc.abstractmethod
    def count(self) -> int:
        """Number of flags (rows), however many distinct images they share."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """Flags, distinct images and image bytes held now (the size gauges)."""

    # -- retention ---------------------------------------------------------------------------

    def prune(self) -> int:
        """Apply the retention: delete flags, oldest unreviewed first (then oldest reviewed), until
        the store fits, then delete images no flag points to. Returns the flags deleted.

        Safe to run from every worker and replica at once: each round measures and deletes under
        one lock, counting only the bytes of images some flag still points to.
        """
        if not self.retention.bounded:
            return 0
        deleted = 0
        for _ in range(PRUNE_ROUNDS):
            removed = self._delete_excess()
            deleted += removed
            if removed == 0:
                break
        self.collect_images()
        return deleted

    @abc.abstractmethod
    def _delete_excess(self) -> int:
        """One round: measure (flags, bytes of referenced images) and delete what
        ``retention.excess`` says, unreviewed first, oldest first, in one locked transaction."""

    @abc.abstractmethod
    def collect_images(self) -> int:
        """Delete images that no flag points to (after a prune); returns how many."""

    # -- export and lifetime -----------------------------------------------------------------

    def export(self, review: str, out: Path | str, *, overwrite: bool = False) -> int:
        """Write the flags in one review state as a labelled folder for ``edgecase train --data``
        (:func:`service.flagged_export.export_flags`); returns the frames written."""
        from service.flagged_export import export_flags

        return export_flags(self, review, out, overwrite=overwrite)

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and threads (the store cannot be used afterwards)."""

    def __enter__(self) -> FlagStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def retention_of(settings: Settings) -> Retention:
    return Retention(settings.flagged_max_frames, settings.flagged_max_bytes)


def open_flag_store(settings: Settings) -> FlagStore:
    """The store the settings describe: PostgreSQL + object store when ``flagged_url`` is set,
    else SQLite + files in ``flagged_dir`` (the default, one machine)."""
    retention = retention_of(settings)
    if settings.flagged_url:
        try:
            from service.flagged_postgres import PostgresFlagStore
        except ModuleNotFoundError as exc:
            raise RuntimeError(
                f"EDGECASE_FLAGGED_URL needs the store extra ({exc.name} is missing): "
                "pip install 'edgecase[store]'"
            ) from exc

        if not settings.flagged_images:
            raise ValueError(
                "EDGECASE_FLAGGED_URL is set but EDGECASE_FLAGGED_IMAGES is not: replicas sharing rows "
                "must share images too (s3://bucket/prefix/ or a shared folder)"
            )
        store: FlagStore = PostgresFlagStore(
            settings.flagged_url,
            settings.flagged_images,
            storage_options=settings.flagged_images_options,
            retention=retention,
            pool_size=settings.flagged_pool_size,
        )
    else:
        from service.flagged import FlaggedStore

        if settings.flagged_images:
            raise ValueError(
                "EDGECASE_FLAGGED_IMAGES needs EDGECASE_FLAGGED_URL (PostgreSQL); the SQLite store keeps "
                "its images under EDGECASE_FLAGGED_DIR"
            )
        store = FlaggedStore(settings.flagged_dir, retention=retention)
    store.max_image_bytes = settings.flagged_max_image_bytes
    return store
