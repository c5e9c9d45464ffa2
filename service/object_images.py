"""Content-addressed images in an object store (``s3://bucket/prefix/``), through fsspec.

The shared flagged store's image half when replicas run on different machines. Objects are named as
the embedded store names its files (``<prefix>/<sha256[:2]>/<sha256>.<ext>``). A PUT is atomic (an
object is complete or absent) and durable once the store answers it, so there is no temporary name
and no fsync: when ``put_many`` returns, every image is readable by every replica. Writing the same
bytes again writes the same object (retries are idempotent).

Credentials and endpoint come from fsspec's usual places: ``storage_options`` (the
``flagged_images_options`` setting) or, for s3fs, the standard AWS variables and files
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for MinIO or another
S3-compatible server, ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from service.image_files import MapFn

OBJECT_STORE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "memory://")
"""URLs that name an object store; anything else is a (shared) folder, kept by ImageFiles."""


def is_object_url(location: str) -> bool:
    return location.lower().startswith(OBJECT_STORE_SCHEMES)


class ObjectImages:
    """Images under an fsspec URL, named by the sha256 of their bytes (identical frames share one)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        from fsspec.core import url_to_fs

        self.location = url
        # Its own client (no fsspec instance cache): a store owns its connection settings.
        self.fs, root = url_to_fs(url, skip_instance_cache=True, **dict(storage_options or {}))
        self.root = str(root).rstrip("/")
        bucket = self.root.split("/", 1)[0]
        if self.fs.protocol not in ("memory", ("memory",)) and not self.fs.exists(bucket):
            # Fail at startup with the name, not on the first edge case with a 500.
            raise ValueError(f"flagged images: bucket {bucket!r} of {url} does not exist or is not reachable")

    def key(self, sha256: str, ext: str) -> str:
        return f"{self.root}/{sha256[:2]}/{sha256}.{ext}"

    def put_many(self, items: Sequence[tuple[bytes, str]], map_fn: MapFn | None = None) -> None:
        """PUT ``(data, ext)`` images; each is durable and readable when this returns."""
        run: MapFn = map_fn or (lambda fn, xs: [fn(x) for x in xs])

        def put(item: tuple[bytes, str]) -> None:
            data, ext = item
            self.fs.pipe_file(self.key(hashlib.sha256(data).hexdigest(), ext), data)

        run(put, items)

    def read(self, sha256: str, ext: str) -> bytes:
        """An image's bytes; ``FileNotFoundError`` if it is not stored."""
        data = self.fs.cat_file(self.key(sha256, ext))
        return bytes(data)

    def delete(self, sha256: str, ext: str) -> None:
        """Remove an image (no error if it is already gone)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(sha256, ext))
