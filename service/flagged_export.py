"""Reviewed flags out of the store, as a labelled folder that ``edgecase train --data`` reads.

This is how the store feeds retraining: frames reviewed as ``normal`` go back into the normal
training set; confirmed and unreviewed edge cases become labelled test frames.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.flag_store import FlaggedRecord, FlagStore

EXPORT_MANIFEST = "flagged_export.json"


def export_flags(store: FlagStore, review: str, out: Path | str, *, overwrite: bool = False) -> int:
    """Write the flags in one review state as a labelled folder; returns the frames written.

    Frames go to ``out/<key>.png`` with keys ``<split>/<family>/<family>_<id:06d>`` (the flag id
    of the first flag of that image) and ``out/labels.csv`` lists them (docs/architecture.md):
    reviewed ``normal`` -> split ``train``, family ``normal``, strength 0 (back into the normal
    training set); ``edge_case`` and ``unreviewed`` (flagged by the model, not yet confirmed) ->
    split ``test``, family ``edge_case``, strength 1. A frame flagged several times is written
    once. ``out/flagged_export.json`` records where every frame came from. Refuses an ``out`` that
    already holds a labels.csv unless ``overwrite``.
    """
    from contract.frames import FrameDecodeError, decode_frame, encode_png
    from contract.labels import LABELS_FILENAME, LabelRow, write_labels
    from contract.writers import open_writer
    from service.flag_store import REVIEW_STATES

    if review not in REVIEW_STATES:
        raise ValueError(f"review must be one of {', '.join(REVIEW_STATES)}, got {review!r}")
    out = Path(out)
    if (out / LABELS_FILENAME).exists() and not overwrite:
        raise FileExistsError(f"{out / LABELS_FILENAME} already exists; choose an empty folder")
    split, family = ("train", "normal") if review == "normal" else ("test", "edge_case")
    strength = 0.0 if review == "normal" else 1.0
    seen: set[str] = set()
    labels: list[LabelRow] = []
    provenance: list[dict[str, Any]] = []
    with open_writer(out, "dir", split) as writer:
        for record in _iter_review(store, review):
            if record.image_sha256 in seen:
                continue
            seen.add(record.image_sha256)
            data = store.image_of(record)  # through the store: a file, or an object in a bucket
            if record.image_ext != "png":
                try:
                    data = encode_png(decode_frame(data))
                except FrameDecodeError as exc:
                    raise ValueError(f"flag {record.id}: stored image is unreadable: {exc}") from exc
            key = f"{split}/{family}/{family}_{record.id:06d}"
            path = writer.write(key, data, {})
            labels.append(LabelRow(key=key, path=path, split=split, family=family, strength=strength))
            provenance.append({"key": key, "flag_id": record.id, **_provenance(record)})
    manifest = {"store": store.location, "review": review, "frames": provenance}
    tmp = out / f".{EXPORT_MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / EXPORT_MANIFEST)
    # labels.csv last: its presence says the folder is complete.
    write_labels(out, labels)
    return len(labels)


def _iter_review(store: FlagStore, review: str, page: int = 500) -> Iterator[FlaggedRecord]:
    """Every flag in one review state, oldest first, a page at a time (bounded memory)."""
    offset = 0
    while True:
        records, _ = store.list(review=review, limit=page, offset=offset, newest_first=False)
        if not records:
            return
        offset += len(records)
        yield from records


def _provenance(record: FlaggedRecord) -> dict[str, Any]:
    """Where an exported frame came from (kept beside the export, in flagged_export.json)."""
    return {
        "model": record.model,
        "version": record.version,
        "score": record.score,
        "p_value": record.p_value,
        "client_key": record.key,
        "image_sha256": record.image_sha256,
        "review": record.review,
    }
