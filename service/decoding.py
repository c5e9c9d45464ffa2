"""Turn a POST /score request into named image payloads, then into one model-input batch, within limits.

Three request shapes are accepted (all declared in the OpenAPI spec by `routes/score.py`):
multipart/form-data with repeated `files` parts (key = filename), a raw image body (image/png,
image/jpeg, image/webp; key "0"), and JSON `{"frames": [{"key": ..., "image": <base64>}]}` (key = the
client's, else the index). The body is read with a byte limit before anything is parsed (and
`service.limits` bounds it while it streams); JSON is parsed with a bound on the number of objects, so
two million tiny items stop at the limit instead of being built. Each part's declared Content-Type
(the part's, or the raw body's) is checked against its bytes.

Memory is bounded by decoded pixels, not bytes received: `prepare_batch` reads every frame's header
first (`contract.frames.probe_frame`) and refuses the request (413, naming the frame) when one frame or
the request's total of pixels that will really be decoded (a JPEG at the draft scale
`contract.frames.draft_request` asks for the model's H x W and resize rule) is over its limit; only
then does it decode, and each frame is resized to the model's input right after it is decoded
(`contract.frames.decode_resized` with the manifest's `input.size` and `input.resize_rule`), so one
full-size frame at a time is alive per decode thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from contract.frames import (
    FrameDecodeError,
    FrameSize,
    FrameTooLargeError,
    UnsupportedFormatError,
    decode_resized,
    draft_request,
    probe_frame,
)
from service.errors import (
    BadRequestError,
    CorruptFrameError,
    PayloadTooLargeError,
    ServiceError,
    UnsupportedFrameFormatError,
    UnsupportedMediaTypeError,
)

RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
MULTIPART = "multipart/form-data"
JSON = "application/json"
FILES_FIELD = "files"
INLINE_PARSE_BYTES = 32 * 1024
"""JSON bodies up to this size are parsed on the event loop; larger ones in a worker thread."""
INLINE_PROBE_FRAMES = 4
"""Requests of up to this many frames have their headers read on the event loop (~30 us each)."""
INLINE_DECODE_PIXELS = 256 * 256
"""...and are decoded there too when they add up to at most this many decoded pixels (~0.2 ms)."""

# Magic numbers of the formats the flagged store keeps as they came; anything else is re-encoded as PNG.
_SIGNATURES: tuple[tuple[bytes, str], ...] = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


class FrameIn(BaseModel):
    """One frame in a JSON request."""

    key: str | None = Field(None, max_length=512, description="client key echoed back; default: index")
    image: str = Field(description="the image file (PNG, JPEG or WebP) as standard base64")


class ScoreJSONRequest(BaseModel):
    """JSON form of POST /score."""

    frames: list[FrameIn] = Field(min_length=1, description="frames to score, answered in this order")


@dataclass
class Payload:
    """One frame as the client sent it: its key and its encoded bytes."""

    key: str
    data: bytes
    content_type: str | None = None
    """The declared type of these bytes (the multipart part's or the raw body's); None in JSON."""

    @property
    def image_ext(self) -> str | None:
        """'png', 'jpg' or 'webp' when the bytes are one of those, else None."""
        for magic, ext in _SIGNATURES:
            if self.data.startswith(magic):
                return ext
        if self.data[:4] == b"RIFF" and self.data[8:12] == b"WEBP":
            return "webp"
        return None


def media_type(request: Request) -> str:
    """The Content-Type without parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes `max_bytes`, declared length or not."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"body is {int(declared):,} bytes; the limit is {max_bytes:,}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"body exceeds the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_payloads(
    request: Request, *, max_body_bytes: int, max_frames: int, max_json_body_bytes: int | None = None
) -> list[Payload]:
    """The request's frames as (key, bytes), in request order; 413/415/422 for what cannot be used."""
    kind = media_type(request)
    if kind not in (MULTIPART, JSON, *RAW_IMAGE_TYPES):
        shown = kind or "none"
        raise UnsupportedMediaTypeError(
            f"Content-Type {shown!r} is not supported; send multipart/form-data (field 'files'), "
            f"application/json, or a raw {', '.join(RAW_IMAGE_TYPES)} body"
        )
    limit = min(max_body_bytes, max_json_body_bytes or max_body_bytes) if kind == JSON else max_body_bytes
    body = await read_body(request, limit)
    if kind in RAW_IMAGE_TYPES:
        payloads = [Payload("0", body, kind)]
    elif kind == JSON:
        # json.loads + base64 of a big body is milliseconds of CPU: not on the event loop.
        payloads = (
            _parse_json(body, max_frames)
            if len(body) <= INLINE_PARSE_BYTES
            else await asyncio.to_thread(_parse_json, body, max_frames)
        )
    else:
        payloads = await _parse_multipart(request, body, max_frames)
    if not payloads:
        raise BadRequestError("the request holds no frames")
    if len(payloads) > max_frames:
        raise PayloadTooLargeError(f"{len(payloads)} frames in one request; the limit is {max_frames}")
    return payloads


def _parse_json(body: bytes, max_frames: int) -> list[Payload]:
    objects = 0

    def count_objects(value: dict[str, object]) -> dict[str, object]:
        # Called as each object is closed: a body of two million {"image": ""} items stops here at
        # max_frames + 2 objects (the request and its frames), before the rest is even scanned.
        nonlocal objects
        objects += 1
        if objects > max_frames + 1:
            raise PayloadTooLargeError(f"more than {max_frames} frames in one request (the limit)")
        return value

    try:
        document = json.loads(body, object_hook=count_objects)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequestError("body is not valid JSON: nested too deeply") from exc
    try:
        request = ScoreJSONRequest.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise BadRequestError(f"JSON body does not match the schema: {problems}") from exc
    payloads = []
    for index, frame in enumerate(request.frames):
        key = frame.key if frame.key is not None else str(index)
        try:
            data = base64.b64decode(frame.image, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CorruptFrameError(f"frame {key!r}: image is not valid base64: {exc}", frame=key) from exc
        payloads.append(Payload(key, data))
    return payloads


async def _parse_multipart(request: Request, body: bytes, max_frames: int) -> list[Payload]:
    # Re-parse the already size-checked body: a fresh Request over the same scope, fed from memory.
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replayed = Request(request.scope, receive)
    try:
        form = await replayed.form(max_files=max_frames + 1, max_fields=max_frames + 16)
    except Exception as exc:  # python-multipart / starlette raise several types for malformed bodies
        raise BadRequestError(f"malformed multipart body: {exc}") from exc
    try:
        payloads = []
        for index, item in enumerate(form.getlist(FILES_FIELD)):
            if isinstance(item, UploadFile):
                declared = item.content_type.split(";")[0].strip().lower() if item.content_type else None
                payloads.append(Payload(item.filename or str(index), await item.read(), declared))
            else:  # a plain text field called "files": the client forgot filename=
                payloads.append(Payload(str(index), item.encode()))
        if not payloads:
            raise BadRequestError(
                f"multipart body has no {FILES_FIELD!r} parts (fields: {list(form.keys())})"
            )
        return payloads
    finally:
        await form.close()


@dataclass(frozen=True)
class PixelLimits:
    """What one request may make the service decode."""

    per_frame: int
    per_request: int


def frame_error(payload: Payload, exc: FrameDecodeError) -> ServiceError:
    """The HTTP error for a frame that cannot be used: 413 too large, 422 wrong format or corrupt."""
    detail = f"frame {payload.key!r}: {exc.reason}"
    if isinstance(exc, FrameTooLargeError):
        return PayloadTooLargeError(detail, frame=payload.key)
    if isinstance(exc, UnsupportedFormatError):
        return UnsupportedFrameFormatError(detail, frame=payload.key)
    return CorruptFrameError(detail, frame=payload.key)


def probe_payloads(payloads: Sequence[Payload], size: FrameSize, limits: PixelLimits, *, rule: str) -> int:
    """Read every header (no pixel decoded); the pixels the decode will produce, or 413 naming the frame.

    Per frame the header's full size counts against ``limits.per_frame`` (what Pillow would allocate
    without draft); per request the pixels really decoded (a large JPEG at the draft scale that
    ``draft_request`` asks for a ``size`` model under ``rule``) count against ``limits.per_request``.
    """
    total = 0
    for payload in payloads:
        try:
            header = probe_frame(payload.data, content_type=payload.content_type)
        except FrameDecodeError as exc:
            raise frame_error(payload, exc) from exc
        if header.pixels > limits.per_frame:
            raise PayloadTooLargeError(
                f"frame {payload.key!r}: {header.width}x{header.height} = {header.pixels:,} pixels exceeds "
                f"the limit of {limits.per_frame:,} per frame",
                frame=payload.key,
            )
        total += header.decoded_pixels(draft_request(header.width, header.height, size, rule))
        if total > limits.per_request:
            raise PayloadTooLargeError(
                f"frame {payload.key!r} brings the request to {total:,} decoded pixels; the limit is "
                f"{limits.per_request:,} per request (send fewer or smaller frames per request)",
                frame=payload.key,
            )
    return total


def decode_batch(
    payloads: Sequence[Payload], size: FrameSize, max_pixels: int, *, rule: str
) -> npt.NDArray[np.uint8]:
    """Decode and resize each frame into one NHWC uint8 ``[N, H, W, 3]`` batch (blocking): one full-size
    frame at a time, resized by ``rule`` (the manifest's)."""
    batch = np.empty((len(payloads), size.height, size.width, 3), dtype=np.uint8)
    for i, payload in enumerate(payloads):
        try:
            batch[i] = decode_resized(
                payload.data, size, rule=rule, max_pixels=max_pixels, content_type=payload.content_type
            )
        except FrameDecodeError as exc:
            raise frame_error(payload, exc) from exc
    return batch


def prepare_batch(
    payloads: Sequence[Payload], size: FrameSize, limits: PixelLimits, *, rule: str
) -> npt.NDArray[np.uint8]:
    """Every header checked against the limits first, then decode + resize (blocking: one job, one thread)."""
    probe_payloads(payloads, size, limits, rule=rule)
    return decode_batch(payloads, size, limits.per_frame, rule=rule)
