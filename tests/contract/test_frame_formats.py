"""Only the formats the API promises are decoded, the header is read before any pixel, and large
JPEGs decode at reduced scale (draft mode) without changing what the model sees in kind."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from contract.frames import (
    FrameDecodeError,
    decode_frame,
    decode_resized,
    probe_frame,
    resize_frame,
)


def encoded(fmt: str, size: tuple[int, int] = (40, 30), **save: object) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_promised_formats_decode_and_probe(fmt: str) -> None:
    data = encoded(fmt)
    header = probe_frame(data)
    assert (header.width, header.height, header.format) == (40, 30, fmt)
    assert decode_frame(data).shape == (30, 40, 3)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "ICO", "PPM"])
def test_other_formats_are_refused_whatever_pillow_could_open(fmt: str) -> None:
    data = encoded(fmt, (32, 32))
    with pytest.raises(FrameDecodeError, match="not a recognised image format.*accepted: PNG, JPEG, WEBP"):
        decode_frame(data)
    with pytest.raises(FrameDecodeError):
        probe_frame(data)


def test_bytes_must_be_the_declared_content_type() -> None:
    tiff = encoded("TIFF", (32, 32))
    with pytest.raises(FrameDecodeError):
        decode_frame(tiff, content_type="image/png")
    jpeg = encoded("JPEG")
    with pytest.raises(FrameDecodeError, match="declared image/png but the bytes are JPEG"):
        decode_frame(jpeg, content_type="image/png")
    assert decode_frame(jpeg, content_type="image/jpeg; charset=binary").shape == (30, 40, 3)
    # An unknown or generic declared type does not constrain the allowed formats.
    assert decode_frame(jpeg, content_type="application/octet-stream").shape == (30, 40, 3)


def test_probe_reads_size_without_decoding_a_bomb() -> None:
    # A 1-bit 8000x8000 PNG is a few KB on the wire and 192 MB as RGB.
    buffer = io.BytesIO()
    Image.new("1", (8_000, 8_000)).save(buffer, format="PNG")
    header = probe_frame(buffer.getvalue())
    assert header.pixels == 64_000_000
    with pytest.raises(FrameDecodeError, match="too large"):
        decode_frame(buffer.getvalue(), max_pixels=16_000_000)


def test_jpeg_draft_decodes_large_frames_at_reduced_scale() -> None:
    data = encoded("JPEG", (1920, 1080), quality=90)
    full = decode_frame(data)
    drafted = decode_frame(data, draft_size=64)
    assert full.shape == (1080, 1920, 3)
    # The largest DCT reduction (1/8) that keeps the shorter side >= 64: 1080 / 8 = 135.
    assert drafted.shape == (135, 240, 3)
    # PNG has no draft mode: same pixels either way.
    png = encoded("PNG", (200, 100))
    assert np.array_equal(decode_frame(png, draft_size=16), decode_frame(png))


def test_decode_resized_is_draft_then_the_one_resize_rule() -> None:
    data = encoded("JPEG", (1920, 1080), quality=90)
    model_input = decode_resized(data, 64)
    assert model_input.shape == (64, 64, 3)
    assert np.array_equal(model_input, resize_frame(decode_frame(data, draft_size=64), 64))
    # Draft changes pixels only within JPEG's own reconstruction error of a full decode.
    reference = resize_frame(decode_frame(data), 64).astype(np.int16)
    assert np.abs(model_input.astype(np.int16) - reference).mean() < 8
