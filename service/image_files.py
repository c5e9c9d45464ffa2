"""Content-addressed image files that are either complete under their real name or absent.

The flagged-frame store keeps each image once, at ``root/<sha256[:2]>/<sha256>.<ext>``. A file is
written to a temporary name in its folder, fsynced, moved into place with ``os.replace``; the
caller then fsyncs the folders (:func:`fsync_dir`, once per folder for a batch) before anything
that points to the files is committed. A crash at any step leaves at worst an orphan file, never a
half-written one under a real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]

MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}
"""Image extensions the store accepts, with the media type the image route answers with."""


def normalise_ext(ext: str) -> str:
    """``".JPEG"`` -> ``"jpg"``; ``ValueError`` for an extension the store does not keep."""
    ext = ext.lower().lstrip(".")
    if ext not in MEDIA_TYPES:
        raise ValueError(f"image extension {ext!r} is not one of {', '.join(MEDIA_TYPES)}")
    return "jpg" if ext == "jpeg" else ext


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: fsync the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ImageFiles:
    """Images under ``root``, named by the sha256 of their bytes (identical frames share a file)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    @property
    def location(self) -> str:
        return str(self.root)

    def path(self, sha256: str, ext: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.{ext}"

    def read(self, sha256: str, ext: str) -> bytes:
        """An image's bytes; ``FileNotFoundError`` if it is not stored."""
        return self.path(sha256, ext).read_bytes()

    def delete(self, sha256: str, ext: str) -> None:
        """Remove an image (no error if it is already gone)."""
        self.path(sha256, ext).unlink(missing_ok=True)

    def put_many(self, items: Sequence[tuple[bytes, str]], map_fn: MapFn | None = None) -> None:
        """Write ``(data, ext)`` images and make them durable (files, then their folders, fsynced).

        ``map_fn`` runs the writes (e.g. on a thread pool: fsync waits on the disk, not the CPU).
        """
        run: MapFn = map_fn or (lambda fn, xs: [fn(x) for x in xs])
        written = run(lambda item: self.write(item[0], item[1]), items)
        run(fsync_dir, sorted({folder for _, folder in written}))

    def write(self, data: bytes, ext: str) -> tuple[str, Path]:
        """Store ``data`` once under its sha256; returns ``(digest, the folder holding it)``.

        The file itself is fsynced before its rename; the caller fsyncs the returned folders before
        committing anything that points to these images.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        final = self.path(sha256, ext)
        folder = final.parent
        if folder not in self._known_dirs:
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.root)
            self._known_dirs.add(folder)
        if final.is_file() and final.stat().st_size == len(data):
            # Same bytes already stored (content-addressed): only ever renamed in after an fsync. The
            # folder is still synced by the caller, in case the process that renamed it died first.
            return sha256, folder
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{sha256[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return sha256, folder
