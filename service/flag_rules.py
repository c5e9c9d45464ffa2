"""The rules every flagged-store backend applies the same way: what a valid flag is, how much of a
frame is kept (``bounded_image``), and the checks on list and review arguments.

Kept apart from the interface (``service.flag_store``) so that the SQLite and PostgreSQL backends share
one copy of each rule.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from service.flag_store import REVIEW_LABELS, REVIEW_STATES, NewFlag
from service.image_files import normalise_ext


@dataclass(frozen=True)
class PreparedFlag:
    """A validated flag: its bytes, their digest, its normalised extension and metadata as JSON."""

    flag: NewFlag
    data: bytes
    sha256: str
    ext: str
    metadata_json: str


def prepare_flags(flags: Sequence[NewFlag], max_image_bytes: int = 0) -> list[PreparedFlag]:
    """Validate flags before anything is written; ``ValueError`` names the first bad field.

    An image over ``max_image_bytes`` (0 = no cap) is decoded and re-encoded to fit
    (:func:`bounded_image`); the service does that itself with the frame it already decoded, so this
    is the rule's backstop for every other writer (batch scoring, scripts).
    """
    prepared = []
    for flag in flags:
        data = bytes(flag.image)
        if not data:
            raise ValueError("a flagged frame needs image bytes, got 0 bytes")
        ext = flag.ext
        if 0 < max_image_bytes < len(data):
            from contract.frames import FrameDecodeError

            try:
                data, ext = bounded_image(data, None, max_image_bytes)
            except FrameDecodeError as exc:
                raise ValueError(f"a flagged frame over the size cap does not decode: {exc}") from exc
        if not flag.model:
            raise ValueError("a flagged frame needs a model name")
        if not (math.isfinite(flag.score) and math.isfinite(flag.p_value)):
            # A NaN/inf score is a broken model (the service answers 500), not an edge case to review.
            raise ValueError(f"score and p-value must be finite, got {flag.score} and {flag.p_value}")
        if flag.idempotency_key is not None and not flag.idempotency_key:
            raise ValueError("an idempotency key must not be empty (use None for none)")
        try:
            metadata_json = json.dumps(dict(flag.metadata), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        prepared.append(PreparedFlag(flag, data, digest, normalise_ext(ext), metadata_json))
    return prepared


def bounded_image(
    original: bytes, ext: str | None, max_bytes: int, frame: npt.NDArray[np.uint8] | None = None
) -> tuple[bytes, str]:
    """The bytes the store keeps for one flagged frame, at most ``max_bytes`` (0 = no cap).

    The original bytes when their format is one the store keeps and they fit the cap (identical
    frames then share one image); otherwise the decoded frame re-encoded as PNG, shrunk (aspect kept)
    until it fits: a PNG holds at most about 3 bytes a pixel plus one a row, so the pixel budget below
    always fits. What a client sends never decides how much the store keeps. ``frame`` is the decoded
    frame when the caller has it; otherwise the original is decoded here, only when it is needed.
    """
    from contract.frames import decode_frame, encode_png

    if ext and (max_bytes <= 0 or len(original) <= max_bytes):
        return original, ext
    if frame is None:
        frame = decode_frame(original)
    encoded = encode_png(frame)
    if max_bytes <= 0 or len(encoded) <= max_bytes:
        return encoded, "png"
    from PIL import Image

    height, width = frame.shape[:2]
    budget = max(1, (max_bytes - 4096) // 4)  # pixels; 4 bytes each covers RGB, row filters, headers
    scale = math.sqrt(budget / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    small = np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    return encode_png(small), "png"


def as_epoch(when: datetime | float | None) -> float | None:
    """Datetimes without a timezone are taken as UTC (what the API documents)."""
    if when is None or isinstance(when, int | float):
        return when
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def check_list_args(review: str | None, limit: int, offset: int) -> None:
    if review is not None and review not in REVIEW_STATES:
        raise ValueError(f"review must be one of {', '.join(REVIEW_STATES)}, got {review!r}")
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got limit={limit} offset={offset}")


def check_label(label: str) -> None:
    if label not in REVIEW_LABELS:
        raise ValueError(f"review label must be one of {', '.join(REVIEW_LABELS)}, got {label!r}")


def list_filters(
    placeholder: str,
    when: Callable[[datetime | float | None], Any],
    model: str | None,
    version: int | None,
    since: datetime | float | None,
    until: datetime | float | None,
    review: str | None,
) -> tuple[list[str], list[Any]]:
    """``list``'s filters as SQL clauses and parameters (``since`` inclusive, ``until`` exclusive).

    ``placeholder`` is the driver's (``?`` for sqlite3, ``%s`` for psycopg) and ``when`` turns a time
    into the column's type (epoch seconds in SQLite, a timestamp in PostgreSQL).
    """
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("model =", model),
        ("version =", version),
        ("created_at >=", when(since)),
        ("created_at <", when(until)),
        ("review =", review),
    ):
        if value is not None:
            clauses.append(f"{column} {placeholder}")
            params.append(value)
    return clauses, params
