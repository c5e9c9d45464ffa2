"""Where files live: a local path or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file://...``).

Readers and batch scoring accept both. A local path (or ``file://`` URL) stays a ``pathlib.Path``,
so local reads keep their exact behaviour and need nothing beyond the core install. Any other URL
becomes a :class:`RemotePath` over an fsspec filesystem (``pip install 'edgecase[s3]'`` brings
fsspec and s3fs); fsspec is imported only then. No hand-written object-store client: listing,
reading and writing all go through fsspec.

S3-compatible servers are reached the usual way: credentials and ``AWS_ENDPOINT_URL`` from the
environment (botocore reads them), or ``EDGECASE_S3_ENDPOINT_URL`` when only edgecase should use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ENDPOINT_ENV = "EDGECASE_S3_ENDPOINT_URL"


def is_url(source: object) -> bool:
    """True for ``scheme://...`` strings (Windows drive letters are not schemes)."""
    text = os.fspath(source) if isinstance(source, str | os.PathLike) else ""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


def _filesystem(protocol: str) -> Any:
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            f"{protocol}:// URLs need fsspec (and s3fs for s3://): pip install 'edgecase[s3]'"
        ) from exc
    options: dict[str, Any] = {}
    # Named in the options (not only read by botocore) so fsspec's instance cache keys on it.
    endpoint = os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return fsspec.filesystem(protocol, **options)


def as_location(source: str | os.PathLike[str]) -> Path | RemotePath:
    """A local ``Path`` for paths and ``file://`` URLs, a ``RemotePath`` for any other URL."""
    if isinstance(source, RemotePath):
        return source
    if not is_url(source):
        return Path(source)
    text = os.fspath(source)
    protocol, _, rest = text.partition("://")
    protocol = protocol.lower()
    if protocol in ("file", "local"):
        return Path(rest)
    return RemotePath(_filesystem(protocol), protocol, rest.rstrip("/"))


@dataclass(frozen=True)
class RemotePath:
    """A file or folder in an fsspec filesystem, with the few ``pathlib.Path`` methods readers use."""

    fs: Any
    protocol: str
    path: str  # without the protocol, no trailing slash

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __truediv__(self, other: str) -> RemotePath:
        return RemotePath(self.fs, self.protocol, f"{self.path}/{other}".rstrip("/"))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, self.protocol, self.path.rsplit("/", 1)[0])

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def open(self, mode: str = "rb") -> IO[bytes]:
        handle: IO[bytes] = self.fs.open(self.path, mode)
        return handle

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def size(self) -> int:
        return int(self.fs.size(self.path))

    def files(self) -> Iterator[tuple[str, RemotePath]]:
        """Every file below this folder as (relative posix path, location), in no particular order."""
        prefix = self.path + "/"
        for found in self.fs.find(self.path):
            found = str(found)
            if found.startswith(prefix):
                yield found[len(prefix) :], RemotePath(self.fs, self.protocol, found)


def file_size(location: Path | RemotePath) -> int:
    return location.size() if isinstance(location, RemotePath) else location.stat().st_size


def open_binary(location: Path | RemotePath) -> IO[bytes]:
    return location.open("rb")


def write_atomic(location: Path | RemotePath, data: bytes) -> None:
    """Write ``data`` under a hidden temporary name beside ``location``, then rename it into place.

    Readers skip dot-names, so a crash leaves either the old file, the new one, or an ignorable
    temporary file, never a half-written file under the real name. On object stores the rename is
    a copy then delete; the object appears whole, as every PUT does.
    """
    tmp_name = f".{location.name}.{os.getpid()}.tmp"
    if isinstance(location, RemotePath):
        tmp = location.parent / tmp_name
        location.fs.pipe_file(tmp.path, data)
        location.fs.mv(tmp.path, location.path)
        return
    location.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = location.with_name(tmp_name)
    try:
        with open(tmp_path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, location)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fd = os.open(location.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def make_dirs(location: Path | RemotePath) -> None:
    """Create a folder (object stores have no folders: nothing to do there)."""
    if isinstance(location, Path):
        location.mkdir(parents=True, exist_ok=True)


def copy_tree_to_local(source: RemotePath, target: Path) -> None:
    """Download a folder (e.g. one model of a repository) to ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for relative, remote in source.files():
        local = target / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        source.fs.get_file(remote.path, str(local))
