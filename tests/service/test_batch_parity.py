"""A frame scores the same in batch scoring as in the service, for the same bytes.

Both decode with ``contract.frames.decode_resized`` (JPEG draft mode, then the one resize rule): a large
JPEG (where draft decoding matters), a small one and a PNG score identically in a tar shard and
through the service's ``decode_batch``.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from service_helpers import publish_model

from contract.frames import decode_resized
from contract.shards import list_shards
from service.batch_scoring import score_shards
from service.decoding import Payload, decode_batch
from service.registry import ModelRegistry

SIZE = 16


def encoded(array: np.ndarray, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_batch_scores_equal_the_services_for_the_same_bytes(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", "bright", 1, size=SIZE)
    model = ModelRegistry(tmp_path / "models").load("bright")
    rng = np.random.default_rng(7)
    gradient = np.linspace(0, 255, 640, dtype=np.float64)[None, :, None] * np.ones((480, 1, 3))
    noisy = np.clip(gradient + rng.normal(0, 20, gradient.shape), 0, 255).astype(np.uint8)
    frames = {
        "large-jpeg": encoded(noisy, "JPEG", quality=90),  # 640x480 for a 16-px model: drafted at 1/8
        "small-jpeg": encoded(noisy[:20, :24], "JPEG", quality=90),  # too small to draft
        "png": encoded(noisy[:100, :120], "PNG"),
    }
    with tarfile.open(tmp_path / "frames-00000.tar", "w") as tar:
        for key, blob in frames.items():
            ext = "jpg" if "jpeg" in key else "png"
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

    score_shards(model, list_shards([tmp_path / "frames-00000.tar"]), tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "frames-00000.parquet").to_pylist()
    batch = {row["key"]: row["score"] for row in rows}

    one_rule = {
        key: float(model.score(decode_resized(blob, SIZE)[None])["score"][0]) for key, blob in frames.items()
    }
    assert batch == one_rule  # exactly: same pixels, same session

    # The service's decode of the same bytes (drafted JPEG included): the same scores, exactly.
    payloads = [Payload(key, blob) for key, blob in frames.items()]
    decoded = decode_batch(payloads, model.input_size, 40_000_000, rule=model.resize_rule)
    service_scores = model.score(decoded)["score"]
    assert batch == dict(zip(frames, map(float, service_scores), strict=True))
