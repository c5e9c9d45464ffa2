"""What a frame is: one decode function, one resize rule, one PNG encoder.

Training, batch scoring and the HTTP service all turn bytes into frames here, so a model sees the
same pixels offline and online. A frame is a ``numpy.ndarray`` of dtype ``uint8`` and shape
``(H, W, 3)`` in RGB order (see docs/architecture.md).

Safety: the image header is checked against ``max_pixels`` before any pixel data is decoded
(decompression bombs), and truncated files raise instead of being padded with grey (Pillow's
``LOAD_TRUNCATED_IMAGES`` is deliberately left off).

The pixel rule (one rule for every mode Pillow hands back, so training, batch scoring and the service
see the same pixels):

- **EXIF orientation is applied**: a frame is what a viewer shows (the reviewer's browser applies the
  tag too), so a phone JPEG stored sideways with Orientation 6 is scored upright. Width and height,
  hence pixel counts and limits, are the header's (a rotation does not change them).
- **16-bit samples keep their high byte** (``value >> 8``, i.e. ``round-down(value / 257)``),
  whatever the values: Pillow already does that for 16-bit RGB, and grey follows it (Pillow's
  ``convert`` would clip at 255 instead).
- **Alpha is dropped, not composited**: RGBA, LA and palette-with-transparency frames keep their
  stored colours (a transparent pixel is the colour stored under it). A camera never sends alpha;
  compositing on an arbitrary background would invent pixels.
- **CMYK** (JPEG) goes through Pillow's CMYK -> RGB conversion (``R = 255 - C`` scaled by K, no
  colour profile); grey, LA and palette become RGB with equal channels or their palette colours.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, UnidentifiedImageError

RESIZE_RULE = "fit-pad-bilinear"
"""Name of the resize rule new models are exported with, as written in model manifests: the frame is
resized (Pillow BILINEAR) to fit inside the model's H x W keeping its aspect ratio, then padded with
black to H x W, centred. A camera frame whose aspect matches the model (1920x1080 -> 256x144) is only
resized; nothing of any frame is cropped away."""

LEGACY_RESIZE_RULE = "center-crop-bilinear"
"""The rule of models exported before 0.3 (square inputs): the largest centred crop of the model's
aspect, then BILINEAR. Still applied for manifests that name it, so those models score as trained."""

RESIZE_RULES: tuple[str, ...] = (RESIZE_RULE, LEGACY_RESIZE_RULE)

SUPPORTED_IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
"""File extensions the folder readers pick up (lower case; matched case-insensitively)."""

DEFAULT_MAX_PIXELS = 40_000_000

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
"""The formats the API promises (Pillow's names). Nothing else is opened: TIFF, PSD, EPS, ICO and
JPEG 2000 bring large, rarely exercised decoders and are not what a camera pipeline uploads."""

CONTENT_TYPE_FORMATS: dict[str, str] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
}
"""Declared content type -> the format the bytes must then be."""

# What Pillow raises on bad input (its fuzzers accept exactly these as "clean" failures).
_PILLOW_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # broken chunk structure, bad CRC
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # raised as an exception when warnings are errors
)

# A broken EXIF block warns (UserWarning: an error where warnings are errors, as in tests).
_EXIF_ERRORS: tuple[type[BaseException], ...] = (*_PILLOW_DECODE_ERRORS, UserWarning)

# 16-bit greyscale modes: scaled to 8 bits rather than clipped (Pillow's convert clips at 255).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# EXIF Orientation value -> the transpose that shows the frame upright (the EXIF 2.3 table, as in
# Pillow's ImageOps.exif_transpose, which is not used because it copies even unrotated images).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class FrameDecodeError(ValueError):
    """Bytes that are not a usable image; ``reason`` says why in words a user can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedFormatError(FrameDecodeError):
    """An image, perhaps, but not in an allowed format, or not in the format its content type declares."""


class FrameTooLargeError(FrameDecodeError):
    """More pixels than ``max_pixels`` (or Pillow's own decompression-bomb limit)."""


class FrameSize(NamedTuple):
    """A model input's size, ``(height, width)`` like a frame's shape; written ``WxH`` (``256x144``)."""

    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def pixels(self) -> int:
        return self.height * self.width


def frame_size(value: int | str | tuple[int, int]) -> FrameSize:
    """Parse a size as users and configs write it: ``64`` or ``"64"`` (square), ``"256x144"`` (W x H,
    as cameras and ``--size`` say it) or a ``(height, width)`` pair (a frame's shape, a FrameSize).

    Raises ``ValueError`` with the accepted forms for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"size must be N or WxH, got {value!r}")
    if isinstance(value, int | np.integer):
        height = width = int(value)
    elif isinstance(value, str):
        parts = value.strip().lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must be N or WxH (e.g. 64 or 256x144), got {value!r}")
        width, height = int(parts[0]), int(parts[-1])
    elif isinstance(value, tuple | list) and len(value) == 2:
        height, width = (int(v) for v in value)
    else:
        raise ValueError(f"size must be N, 'WxH' or (height, width), got {value!r}")
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {width}x{height}")
    return FrameSize(height, width)


def fitted_box(height: int, width: int, size: FrameSize) -> tuple[int, int]:
    """``(h, w)`` a ``height x width`` frame is resized to before padding by the fit-pad rule."""
    scale = min(size.height / height, size.width / width)
    return (
        min(size.height, max(1, round(height * scale))),
        min(size.width, max(1, round(width * scale))),
    )


def draft_request(
    width: int, height: int, size: int | str | tuple[int, int], rule: str = RESIZE_RULE
) -> tuple[int, int]:
    """``(w, h)`` a stored ``width x height`` JPEG may be draft-decoded down to without losing a pixel
    that ``rule`` uses (Pillow-style, width first; for ``decode_frame(draft_size=...)`` and
    :meth:`FrameHeader.decoded_pixels`).

    The header's sides are the stored ones; an EXIF rotation may swap them before the rule applies,
    so the request covers both orientations: the larger of the two scales the rule could need.
    """
    target = frame_size(size)
    if rule == LEGACY_RESIZE_RULE:
        # The crop keeps one side whole; that side must stay at least the model's on either orientation.
        side = max(target.height, target.width)
        return (side, side)
    scale = max(
        min(target.height / height, target.width / width),
        min(target.height / width, target.width / height),
    )
    return (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))


@dataclass(frozen=True)
class FrameHeader:
    """What an image's header says, read without decoding any pixel data."""

    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decoded_pixels(self, draft_size: int | tuple[int, int] | None = None) -> int:
        """Pixels a decode with ``draft_size`` will really produce: a JPEG's draft scale is applied.

        Mirrors Pillow's ``JpegImageFile.draft``: the largest of 1/8, 1/4, 1/2 that keeps the sides at
        least ``draft_size`` (an int for both sides, or ``(w, h)``), sides rounded up. Other formats
        decode at full size.
        """
        if draft_size is None or self.format != "JPEG":
            return self.pixels
        dw, dh = (draft_size, draft_size) if isinstance(draft_size, int) else draft_size
        if dw < 1 or dh < 1:
            return self.pixels
        fits = min(self.width // dw, self.height // dh)
        scale = next((s for s in (8, 4, 2) if fits >= s), 1)
        return ((self.width + scale - 1) // scale) * ((self.height + scale - 1) // scale)


def probe_frame(
    data: bytes, *, formats: tuple[str, ...] = ALLOWED_FORMATS, content_type: str | None = None
) -> FrameHeader:
    """Read the header only: size and format, so limits are checked before any decode.

    Raises ``FrameDecodeError`` for empty or unrecognised bytes, a format outside ``formats``, or
    bytes whose format is not the declared ``content_type`` (e.g. a TIFF sent as ``image/png``).
    """
    with _open(data, formats, content_type) as image:
        return FrameHeader(int(image.size[0]), int(image.size[1]), str(image.format))


def decode_frame(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    content_type: str | None = None,
    draft_size: int | tuple[int, int] | None = None,
) -> npt.NDArray[np.uint8]:
    """Decode PNG, JPEG or WebP into an RGB uint8 ``(H, W, 3)`` array.

    Grey, palette, LA, RGBA, CMYK and 16-bit images become 8-bit RGB by the module's pixel rule
    (EXIF orientation applied, 16-bit -> high byte, alpha dropped). Only the first frame of an
    animation is used.
    ``draft_size`` (an int for both sides or ``(w, h)``, see :func:`draft_request`) lets a JPEG
    decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode, a DCT-domain reduction) as long as its
    sides stay at least that: a 1080p frame for a 256x144 model decodes at 480x270 instead of
    1920x1080, which is most of its decode time and all of its memory. Use :func:`decode_resized` to
    get a model input.
    Raises ``FrameDecodeError`` for empty, corrupt or truncated input, its subclass
    ``FrameTooLargeError`` above ``max_pixels``, and ``UnsupportedFormatError`` for a format outside
    ``formats`` or bytes that are not the declared ``content_type``.
    Pillow's own bomb guard (a warning above ~89 M pixels, an error above ~179 M) still applies,
    so a ``max_pixels`` above those limits does not let larger images through.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    try:
        # Image.open reads only the header: the size check below happens before pixel decoding.
        with _open(data, formats, content_type) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise FrameDecodeError(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise FrameTooLargeError(
                    f"image too large: {width}x{height} = {width * height:,} pixels "
                    f"exceeds the limit of {max_pixels:,} (possible decompression bomb)"
                )
            if draft_size is not None and image.format == "JPEG":
                dw, dh = (draft_size, draft_size) if isinstance(draft_size, int) else draft_size
                image.draft("RGB", (int(dw), int(dh)))
            image.load()
            return _to_rgb_array(_upright(image))
    except FrameDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FrameTooLargeError(f"image too large (possible decompression bomb): {exc}") from exc
    except _PILLOW_DECODE_ERRORS as exc:
        raise FrameDecodeError(f"corrupt or truncated image: {exc}") from exc


def decode_resized(
    data: bytes,
    size: int | str | tuple[int, int],
    *,
    rule: str = RESIZE_RULE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    content_type: str | None = None,
) -> npt.NDArray[np.uint8]:
    """Bytes to a model input of ``size`` (see :func:`frame_size`): the one decode (with JPEG draft)
    then the resize rule ``rule`` (the manifest's).

    Every path that turns bytes into a model input (readers, the service, batch scoring) calls this,
    so a frame scores the same wherever it is scored. Only one frame's full-size pixels are alive at
    a time per caller.
    """
    target = frame_size(size)
    header = probe_frame(data, formats=formats, content_type=content_type)
    draft = draft_request(header.width, header.height, target, rule)
    frame = decode_frame(
        data, max_pixels=max_pixels, formats=formats, content_type=content_type, draft_size=draft
    )
    return resize_frame(frame, target, rule)


def _open(data: bytes, formats: tuple[str, ...], content_type: str | None) -> Image.Image:
    """Open the header of ``data`` allowing only ``formats`` (and the declared type's format)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decoding expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise FrameDecodeError("empty file (0 bytes)")
    expected = None
    if content_type is not None:
        expected = CONTENT_TYPE_FORMATS.get(content_type.split(";")[0].strip().lower())
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError as exc:
        allowed = ", ".join(formats)
        raise UnsupportedFormatError(
            f"not a recognised image format ({len(data)} bytes; accepted: {allowed})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FrameTooLargeError(f"image too large (possible decompression bomb): {exc}") from exc
    except _PILLOW_DECODE_ERRORS as exc:
        raise FrameDecodeError(f"corrupt or truncated image: {exc}") from exc
    if expected is not None and image.format != expected:
        image.close()
        raise UnsupportedFormatError(f"declared {content_type} but the bytes are {image.format}")
    return image


def _upright(image: Image.Image) -> Image.Image:
    """The loaded image turned as its EXIF Orientation says (the same image when there is none)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _EXIF_ERRORS:  # broken EXIF is not a broken frame: pixels as stored
        return image
    method = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def _to_rgb_array(image: Image.Image) -> npt.NDArray[np.uint8]:
    """Convert a loaded Pillow image to a writable RGB uint8 array with at most one copy."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # The high byte, whatever the values (a dark 16-bit frame stays dark), as for 16-bit RGB.
        wide = np.asarray(image)
        if wide.dtype != np.uint16:  # mode "I" is int32
            wide = np.clip(wide, 0, 65535).astype(np.uint16)
        grey = (wide >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("P", "PA"):
        # Alpha is dropped: without the tRNS entry, convert() gives the stored palette colours (and
        # does not warn that an alpha table "should be converted to RGBA").
        image.info.pop("transparency", None)
    if image.mode != "RGB":
        image = image.convert("RGB")
    # np.array (not asarray) so the frame is writable: torch.from_numpy warns on read-only arrays.
    return np.array(image, dtype=np.uint8)


def _check_frame(frame: npt.NDArray[np.uint8]) -> None:
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"a frame is a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"a frame is uint8 (H, W, 3) RGB; got dtype {frame.dtype} shape {frame.shape}")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame has no pixels: shape {frame.shape}")


def resize_frame(
    frame: npt.NDArray[np.uint8], size: int | str | tuple[int, int], rule: str = RESIZE_RULE
) -> npt.NDArray[np.uint8]:
    """Apply the resize rule ``rule`` to get a frame of ``size`` (an int for square, ``"WxH"`` or
    ``(height, width)``; see :func:`frame_size`).

    ``fit-pad-bilinear`` (:data:`RESIZE_RULE`): resize with Pillow's BILINEAR filter (which antialiases
    when shrinking) to the largest box of the frame's aspect that fits, then pad with black to the
    model's size, centred (an odd margin puts the extra pixel at the bottom/right). A frame of the
    model's aspect is only resized; no pixel of any frame is cropped away.
    ``center-crop-bilinear`` (:data:`LEGACY_RESIZE_RULE`): the largest centred crop of the model's
    aspect, then BILINEAR; kept for models exported with it.
    A frame already of ``size`` is returned unchanged (same object) by both rules.
    """
    _check_frame(frame)
    target = frame_size(size)
    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {rule!r}; known: {', '.join(RESIZE_RULES)}")
    height, width = frame.shape[:2]
    if (height, width) == target:
        return frame
    if rule == LEGACY_RESIZE_RULE:
        return _crop_resize(frame, target)
    fh, fw = fitted_box(height, width, target)
    content = _bilinear(frame, fh, fw)
    if (fh, fw) == target:
        return content
    out = np.zeros((target.height, target.width, 3), dtype=np.uint8)
    top, left = (target.height - fh) // 2, (target.width - fw) // 2
    out[top : top + fh, left : left + fw] = content
    return out


def _crop_resize(frame: npt.NDArray[np.uint8], target: FrameSize) -> npt.NDArray[np.uint8]:
    height, width = frame.shape[:2]
    # The largest centred crop of the target's aspect (integer sides, never larger than the frame).
    if width * target.height >= height * target.width:
        ch, cw = height, min(width, max(1, round(height * target.width / target.height)))
    else:
        ch, cw = min(height, max(1, round(width * target.height / target.width))), width
    top, left = (height - ch) // 2, (width - cw) // 2
    return _bilinear(frame[top : top + ch, left : left + cw], target.height, target.width)


def _bilinear(frame: npt.NDArray[np.uint8], height: int, width: int) -> npt.NDArray[np.uint8]:
    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame)
    resized = Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


def encode_png(frame: npt.NDArray[np.uint8], compress_level: int = 1) -> bytes:
    """Encode a frame as PNG; level 1 by default because writing must keep up with generation."""
    _check_frame(frame)
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be 0..9, got {compress_level}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
