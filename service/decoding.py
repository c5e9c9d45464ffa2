"""Turn a POST /score request into named image payloads, then into frames, within the limits.

Three request shapes are accepted (all declared in the OpenAPI spec by `routes/score.py`):
multipart/form-data with repeated `files` parts (key = filename), a raw image body (image/png,
image/jpeg, image/webp; key "0"), and JSON `{"frames": [{"key": ..., "image": <base64>}]}` (key = the
client's, else the index). The body is read with a byte limit before anything is parsed; decoding
and resizing use the one rule in `contract.frames` and run in a worker thread, never on the event loop.
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

from contract.frames import FrameDecodeError, decode_frame, resize_frame
from service.errors import (
    BadRequestError,
    CorruptFrameError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)

RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
MULTIPART = "multipart/form-data"
JSON = "application/json"
FILES_FIELD = "files"
INLINE_PARSE_BYTES = 32 * 1024
"""JSON bodies up to this size are parsed on the event loop; larger ones in a worker thread."""

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


async def parse_payloads(request: Request, *, max_body_bytes: int, max_frames: int) -> list[Payload]:
    """The request's frames as (key, bytes), in request order; 413/415/422 for what cannot be used."""
    kind = media_type(request)
    if kind not in (MULTIPART, JSON, *RAW_IMAGE_TYPES):
        shown = kind or "none"
        raise UnsupportedMediaTypeError(
            f"Content-Type {shown!r} is not supported; send multipart/form-data (field 'files'), "
            f"application/json, or a raw {', '.join(RAW_IMAGE_TYPES)} body"
        )
    body = await read_body(request, max_body_bytes)
    if kind in RAW_IMAGE_TYPES:
        payloads = [Payload("0", body)]
    elif kind == JSON:
        # json.loads + base64 of a big body is milliseconds of CPU: not on the event loop.
        payloads = (
            _parse_json(body)
            if len(body) <= INLINE_PARSE_BYTES
            else await asyncio.to_thread(_parse_json, body)
        )
    else:
        payloads = await _parse_multipart(request, body, max_frames)
    if not payloads:
        raise BadRequestError("the request holds no frames")
    if len(payloads) > max_frames:
        raise PayloadTooLargeError(f"{len(payloads)} frames in one request; the limit is {max_frames}")
    return payloads


def _parse_json(body: bytes) -> list[Payload]:
    try:
        request = ScoreJSONRequest.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"body is not valid JSON: {exc}") from exc
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
                payloads.append(Payload(item.filename or str(index), await item.read()))
            else:  # a plain text field called "files": the client forgot filename=
                payloads.append(Payload(str(index), item.encode()))
        if not payloads:
            raise BadRequestError(
                f"multipart body has no {FILES_FIELD!r} parts (fields: {list(form.keys())})"
            )
        return payloads
    finally:
        await form.close()


def decode_frames(payloads: Sequence[Payload], *, max_pixels: int) -> list[npt.NDArray[np.uint8]]:
    """Decode every payload (blocking: call in a thread); 422 naming the first bad frame, 413 for bombs."""
    frames = []
    for payload in payloads:
        try:
            frames.append(decode_frame(payload.data, max_pixels=max_pixels))
        except FrameDecodeError as exc:
            if exc.reason.startswith("image too large"):
                raise PayloadTooLargeError(f"frame {payload.key!r}: {exc.reason}", frame=payload.key) from exc
            raise CorruptFrameError(f"frame {payload.key!r}: {exc.reason}", frame=payload.key) from exc
    return frames


def to_batch(frames: Sequence[npt.NDArray[np.uint8]], height: int, width: int) -> npt.NDArray[np.uint8]:
    """Resize frames by the manifest's rule and stack them into one NHWC uint8 batch (blocking)."""
    if height != width:
        raise ValueError(f"the center-crop-bilinear rule makes square frames; model wants {height}x{width}")
    batch = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        batch[i] = resize_frame(frame, height)
    return batch
