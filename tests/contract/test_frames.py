"""Specification of contract.frames: what decodes to a frame, what is refused, and the one resize rule."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from contract.frames import (
    LEGACY_RESIZE_RULE,
    RESIZE_RULE,
    RESIZE_RULES,
    SUPPORTED_IMAGE_EXTENSIONS,
    FrameDecodeError,
    decode_frame,
    draft_request,
    encode_png,
    frame_size,
    resize_frame,
)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _random_frame(height: int = 12, width: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _assert_frame(frame: np.ndarray, height: int, width: int) -> None:
    assert frame.dtype == np.uint8
    assert frame.shape == (height, width, 3)
    assert frame.flags.writeable, "frames must be writable (torch.from_numpy warns otherwise)"


# --- decoding ---------------------------------------------------------------------------------


def test_png_round_trips_exactly() -> None:
    frame = _random_frame()
    decoded = decode_frame(encode_png(frame))
    _assert_frame(decoded, 12, 20)
    np.testing.assert_array_equal(decoded, frame)


def test_grayscale_becomes_rgb_with_equal_channels() -> None:
    grey = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    decoded = decode_frame(_save(Image.fromarray(grey), "PNG"))
    _assert_frame(decoded, 6, 10)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], grey)


def test_rgba_drops_alpha_without_compositing() -> None:
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 0  # fully transparent
    decoded = decode_frame(_save(Image.fromarray(rgba), "PNG"))
    _assert_frame(decoded, 4, 5)
    assert (decoded == [200, 100, 50]).all()


def test_grey_with_alpha_becomes_rgb() -> None:
    image = Image.new("LA", (3, 2), (77, 10))
    decoded = decode_frame(_save(image, "PNG"))
    _assert_frame(decoded, 2, 3)
    assert (decoded == 77).all()


def test_palette_image_becomes_its_colours() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * (3 * 254))
    decoded = decode_frame(_save(image, "PNG"))
    _assert_frame(decoded, 4, 4)
    assert (decoded == [10, 20, 30]).all()


def test_sixteen_bit_grey_png_is_scaled_not_clipped() -> None:
    wide = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    data = _save(Image.fromarray(wide), "PNG")
    decoded = decode_frame(data)
    _assert_frame(decoded, 1, 3)
    assert decoded[0, :, 0].tolist() == [0, 128, 255]


def test_jpeg_decodes_close_to_the_original() -> None:
    flat = np.full((16, 16, 3), (30, 120, 220), dtype=np.uint8)
    decoded = decode_frame(_save(Image.fromarray(flat), "JPEG", quality=95))
    _assert_frame(decoded, 16, 16)
    assert np.abs(decoded.astype(int) - flat).max() <= 3


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_frame(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    _assert_frame(decoded, 8, 8)
    red, green, blue = decoded.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 50 and blue < 50


def test_lossless_webp_round_trips_exactly() -> None:
    frame = _random_frame(8, 8)
    decoded = decode_frame(_save(Image.fromarray(frame), "WEBP", lossless=True))
    np.testing.assert_array_equal(decoded, frame)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is a text file, not a picture\n", "not a recognised image"),
        (bytes(range(256)) * 4, "not a recognised image"),
    ],
    ids=["zero-bytes", "text-file", "random-bytes"],
)
def test_non_images_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(FrameDecodeError, match=reason) as info:
        decode_frame(data)
    assert isinstance(info.value, ValueError)
    assert info.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_raise_instead_of_being_padded(fmt: str) -> None:
    data = _save(Image.fromarray(_random_frame(64, 64)), fmt)
    with pytest.raises(FrameDecodeError, match="truncated|corrupt"):
        decode_frame(data[: len(data) // 2])


def test_png_with_corrupted_pixel_data_is_refused() -> None:
    data = bytearray(encode_png(_random_frame(32, 32)))
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 40] = bytes(32)  # zero out compressed pixels inside the IDAT chunk
    with pytest.raises(FrameDecodeError):
        decode_frame(bytes(data))


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched (CRC fixed) to claim ``width x height`` pixels."""
    data = bytearray(_save(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(
    "side",
    [7_000, 10_000, 100_000],
    ids=["over-our-limit", "over-pillow-warning", "over-pillow-error"],
)
def test_decompression_bombs_are_refused_from_the_header(side: int) -> None:
    start = time.perf_counter()
    with pytest.raises(FrameDecodeError, match="too large"):
        decode_frame(_png_claiming(side, side))
    assert time.perf_counter() - start < 1.0


def test_max_pixels_is_configurable() -> None:
    data = encode_png(_random_frame(10, 10))
    with pytest.raises(FrameDecodeError, match="100 pixels exceeds the limit of 99"):
        decode_frame(data, max_pixels=99)
    assert decode_frame(data, max_pixels=100).shape == (10, 10, 3)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(TypeError):
        decode_frame("not bytes")  # type: ignore[arg-type]


# --- the one resize rule ----------------------------------------------------------------------


def _banded(height: int, width: int) -> np.ndarray:
    """Blue square in the middle of a frame whose margins (left/right or top/bottom) are red."""
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[...] = (255, 0, 0)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    frame[top : top + side, left : left + side] = (0, 0, 255)
    return frame


@pytest.mark.parametrize(
    ("frame_hw", "size", "box_hw"),
    [
        ((1080, 1920), "256x144", (144, 256)),  # 16:9 camera into the 16:9 default: resize only
        ((720, 1280), (144, 256), (144, 256)),
        ((480, 640), "256x144", (144, 192)),  # 4:3: bars left and right
        ((300, 300), "256x144", (144, 144)),  # square
        ((1080, 1920), 64, (36, 64)),  # 16:9 into a square model: bars top and bottom
        ((64, 64), 64, (64, 64)),
    ],
    ids=["16:9->16:9", "16:9-tuple", "4:3->16:9", "square->16:9", "16:9->square", "square->square"],
)
def test_fit_pad_keeps_the_whole_frame_and_pads_with_black(
    frame_hw: tuple[int, int], size: object, box_hw: tuple[int, int]
) -> None:
    frame = np.full((*frame_hw, 3), 200, dtype=np.uint8)
    frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = 201  # edges survive: nothing cropped
    target = frame_size(size)  # type: ignore[arg-type]
    out = resize_frame(frame, size)  # type: ignore[arg-type]
    assert out.shape == (target.height, target.width, 3)
    content = out > 0
    rows, cols = np.flatnonzero(content.any(axis=(1, 2))), np.flatnonzero(content.any(axis=(0, 2)))
    assert (len(rows), len(cols)) == box_hw, "the content box has the frame's aspect"
    top, left = (target.height - box_hw[0]) // 2, (target.width - box_hw[1]) // 2
    assert (rows[0], cols[0]) == (top, left), "centred; an odd margin puts the extra pixel bottom/right"
    assert (out[top : top + box_hw[0], left : left + box_hw[1]] >= 199).all()


def test_fit_pad_is_pillow_bilinear_into_the_box() -> None:
    frame = _random_frame(30, 40)
    out = resize_frame(frame, (16, 16))
    expected = np.array(Image.fromarray(frame).resize((16, 12), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[2:14], expected)
    assert out[:2].max() == 0 and out[14:].max() == 0


def test_a_frame_of_the_models_aspect_is_only_resized() -> None:
    frame = _random_frame(90, 160)
    expected = np.array(Image.fromarray(frame).resize((64, 36), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_frame(frame, "64x36"), expected)


@pytest.mark.parametrize(("height", "width"), [(4, 8), (8, 4), (3, 6), (6, 3), (5, 8)])
def test_the_legacy_rule_centre_crops(height: int, width: int) -> None:
    side = min(height, width)
    resized = resize_frame(_banded(height, width), side, LEGACY_RESIZE_RULE)
    assert resized.shape == (side, side, 3)
    assert (resized == (0, 0, 255)).all(), "the margins must be cropped away"


def test_the_legacy_rule_puts_an_odd_margin_at_bottom_right() -> None:
    frame = np.arange(5, dtype=np.uint8)[None, :, None].repeat(3, axis=2).repeat(2, axis=0)  # 2x5
    assert resize_frame(frame, 2, LEGACY_RESIZE_RULE)[0, :, 0].tolist() == [1, 2]


def test_the_legacy_rule_is_pillow_bilinear_after_the_crop() -> None:
    frame = _random_frame(30, 40)
    expected = np.array(Image.fromarray(frame[:, 5:35]).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_frame(frame, 16, LEGACY_RESIZE_RULE), expected)


def test_an_unknown_rule_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown resize rule 'stretch'"):
        resize_frame(_random_frame(), 8, "stretch")


def test_upscaling_keeps_flat_colours_and_follows_bilinear() -> None:
    flat = np.full((3, 5, 3), (9, 99, 199), dtype=np.uint8)
    up = resize_frame(flat, "20x12")
    assert up.shape == (12, 20, 3) and (up == (9, 99, 199)).all()
    small = _random_frame(2, 2)
    expected = np.array(Image.fromarray(small).resize((7, 7), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_frame(small, 7), expected)


@pytest.mark.parametrize(
    ("text", "expected"), [("64", (64, 64)), (" 256x144 ", (144, 256)), ("1920X1080", (1080, 1920))]
)
def test_sizes_are_written_width_by_height(text: str, expected: tuple[int, int]) -> None:
    size = frame_size(text)
    assert size == expected and str(size) == f"{expected[1]}x{expected[0]}"


@pytest.mark.parametrize("bad", ["", "x", "64x", "256x144x3", "-4", "0x10", "a x b"])
def test_bad_size_texts_are_refused_with_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ValueError, match="size must be"):
        frame_size(bad)


@pytest.mark.parametrize(
    ("stored_wh", "size", "expected"),
    [
        ((1920, 1080), "256x144", (256, 144)),
        ((1080, 1920), "256x144", (144, 256)),
        ((640, 480), 64, (64, 48)),
    ],
    ids=["landscape", "portrait-or-rotated", "4:3->square"],
)
def test_the_jpeg_draft_request_covers_both_orientations(
    stored_wh: tuple[int, int], size: object, expected: tuple[int, int]
) -> None:
    assert draft_request(*stored_wh, size) == expected  # type: ignore[arg-type]


def test_shrinking_is_antialiased() -> None:
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    frame = np.repeat(checker[:, :, None], 3, axis=2)
    small = resize_frame(frame, 8)
    assert np.abs(small.astype(int) - 128).max() <= 2, "a 1-pixel checkerboard averages to grey"


def test_a_frame_of_the_target_size_is_returned_unchanged() -> None:
    frame = _random_frame(16, 16)
    assert resize_frame(frame, 16) is frame


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_resize_rejects_bad_sizes(size: object) -> None:
    with pytest.raises(ValueError, match="size"):
        resize_frame(_random_frame(), size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "frame",
    [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)],
    ids=["2d", "four-channels", "float"],
)
def test_resize_and_encode_reject_arrays_that_are_not_frames(frame: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize_frame(frame, 2)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(frame)


def test_constants_name_the_rule_and_extensions() -> None:
    assert RESIZE_RULE == "fit-pad-bilinear" and LEGACY_RESIZE_RULE == "center-crop-bilinear"
    assert RESIZE_RULES == (RESIZE_RULE, LEGACY_RESIZE_RULE)
    assert SUPPORTED_IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".webp")


def test_encode_png_uses_the_requested_compression() -> None:
    frame = np.zeros((64, 64, 3), dtype=np.uint8)
    fast, small = encode_png(frame), encode_png(frame, compress_level=9)
    assert fast.startswith(b"\x89PNG") and len(small) <= len(fast)
    with pytest.raises(ValueError, match="compress_level"):
        encode_png(frame, compress_level=10)
