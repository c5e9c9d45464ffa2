"""The one pixel rule for unusual frames (16-bit, palette + alpha, CMYK, EXIF-rotated), the same through
every path: `decode_frame`, `decode_resized` (what the service and batch scoring use) and the readers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.frames import (
    FrameHeader,
    decode_frame,
    decode_resized,
    draft_request,
    probe_frame,
    resize_frame,
)
from contract.readers import iter_frames


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return save(image, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def marker_frame() -> np.ndarray:
    """A 2x3 frame with one red pixel top-left: where it ends up shows the rotation."""
    frame = np.zeros((2, 3, 3), dtype=np.uint8)
    frame[0, 0] = (255, 0, 0)
    return frame


# --- 16-bit -------------------------------------------------------------------------------------


def test_sixteen_bit_grey_keeps_the_high_byte_whatever_the_values() -> None:
    # A dark 16-bit frame (every value <= 255) stays dark: the rule does not depend on the data.
    dark = np.array([[0, 255, 200]], dtype=np.uint16)
    decoded = decode_frame(save(Image.fromarray(dark), "PNG"))
    assert decoded[0, :, 0].tolist() == [0, 0, 0]
    bright = np.array([[256, 40000, 65535]], dtype=np.uint16)
    decoded = decode_frame(save(Image.fromarray(bright), "PNG"))
    assert decoded[0, :, 0].tolist() == [1, 40000 >> 8, 255]
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()


def test_sixteen_bit_rgb_keeps_the_high_byte_like_grey() -> None:
    # Pillow cannot write 48-bit PNGs: build one by hand (IHDR bit depth 16, colour type 2).
    import struct
    import zlib

    values = [(0x1234, 0xABCD, 0xFFFF), (0x00FF, 0x0100, 0x8000)]
    raw = b"\x00" + b"".join(struct.pack(">HHH", *px) for px in values)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    decoded = decode_frame(png)
    assert decoded.tolist() == [[[0x12, 0xAB, 0xFF], [0x00, 0x01, 0x80]]]


# --- palette + alpha, alpha in general -----------------------------------------------------------


def test_palette_with_transparency_keeps_the_stored_colours() -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (3 * 254))
    image.putpixel((3, 1), 1)
    data = save(image, "PNG", transparency=0)  # index 0 fully transparent
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    decoded = decode_frame(data)
    assert (decoded[0, 0] == [10, 20, 30]).all(), "a transparent pixel is the colour stored under it"
    assert (decoded[1, 3] == [200, 100, 50]).all()


def test_palette_with_alpha_table_drops_alpha_like_rgba() -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (3 * 254))
    image.putpixel((1, 0), 1)
    data = save(image, "PNG", transparency=bytes([0, 128]))  # a tRNS alpha table: 0 and half
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0], rgba[0, 1] = (10, 20, 30, 0), (200, 100, 50, 128)
    assert np.array_equal(decode_frame(data), decode_frame(save(Image.fromarray(rgba), "PNG")))


# --- CMYK ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 255, 0), (0, 255, 0)), ((0, 0, 0, 128), (127, 127, 127))],
)
def test_cmyk_jpeg_goes_through_pillows_conversion(cmyk: tuple[int, ...], rgb: tuple[int, ...]) -> None:
    decoded = decode_frame(save(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=98))
    assert decoded.shape == (16, 16, 3)
    assert np.abs(decoded.reshape(-1, 3).mean(axis=0) - np.array(rgb)).max() < 4


# --- EXIF orientation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "shape", "red_at"),
    [
        (1, (2, 3), (0, 0)),
        (2, (2, 3), (0, 2)),  # mirrored
        (3, (2, 3), (1, 2)),  # rotated 180
        (6, (3, 2), (0, 1)),  # stored rotated 90 CCW: shown turned 90 CW
        (8, (3, 2), (2, 0)),  # shown turned 90 CCW
    ],
)
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_is_applied(
    fmt: str, orientation: int, shape: tuple[int, int], red_at: tuple[int, int]
) -> None:
    data = with_orientation(Image.fromarray(marker_frame()), fmt, orientation)
    decoded = decode_frame(data)
    assert decoded.shape[:2] == shape
    assert tuple(int(i) for i in np.unravel_index(decoded[..., 0].argmax(), shape)) == red_at
    # Limits are the header's: a rotation does not change the pixel count.
    assert probe_frame(data).pixels == 6


def test_exif_rotated_jpeg_is_upright_through_every_path(tmp_path: Path) -> None:
    # A tall frame, top half white, stored sideways (Orientation 6 = turn 90 CW to show it).
    upright = np.zeros((64, 32, 3), dtype=np.uint8)
    upright[:32] = 255
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # what the camera wrote: 32x64
    data = with_orientation(Image.fromarray(stored), "JPEG", 6)

    frame = decode_frame(data)
    assert frame.shape == (64, 32, 3)
    assert frame[:28].mean() > 240 and frame[36:].mean() < 15, "the top half is the white half"

    model_input = decode_resized(data, 16)
    draft = draft_request(64, 32, 16)  # the stored sides, as the header gives them
    assert np.array_equal(model_input, resize_frame(decode_frame(data, draft_size=draft), 16))
    content = model_input[:, 4:12]  # fit-pad: the 8x16 upright frame, black bars left and right
    assert content[:6].mean() > 240 and content[10:].mean() < 15
    assert model_input[:, :4].max() == 0 and model_input[:, 12:].max() == 0

    (tmp_path / "rotated.jpg").write_bytes(data)
    [read] = [item.image for item in iter_frames(tmp_path, size=16)]
    assert np.array_equal(read, model_input)


def test_a_broken_exif_block_is_ignored_not_fatal() -> None:
    data = save(Image.fromarray(marker_frame()), "PNG", exif=b"Exif\x00\x00II*\x00garbage")
    assert decode_frame(data).shape == (2, 3, 3)


# --- what the service budgets ----------------------------------------------------------------------


def test_decoded_pixels_counts_what_jpeg_draft_really_decodes() -> None:
    data = save(Image.new("RGB", (1920, 1080)), "JPEG")
    header = probe_frame(data)
    assert header.decoded_pixels(None) == header.pixels == 1920 * 1080
    assert header.decoded_pixels(64) == decode_frame(data, draft_size=64).shape[0] * 240 == 240 * 135
    # Not a JPEG: no draft, full size.
    assert FrameHeader(1920, 1080, "PNG").decoded_pixels(64) == 1920 * 1080
    # Smaller than the model's input: full size; an odd size rounds up like Pillow.
    assert FrameHeader(50, 50, "JPEG").decoded_pixels(64) == 2500
    odd = save(Image.new("RGB", (1001, 333)), "JPEG")
    assert probe_frame(odd).decoded_pixels(64) == int(np.prod(decode_frame(odd, draft_size=64).shape[:2]))
