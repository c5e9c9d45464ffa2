"""POST /score: frames in (multipart, raw image or JSON), one verdict per frame out, in order."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from service.auth import require_score
from service.decoding import FILES_FIELD, JSON, MULTIPART, RAW_IMAGE_TYPES, media_type, parse_payloads
from service.errors import error_responses
from service.pool import ModelPool
from service.routes import get_app_settings, get_pool, get_store
from service.scorer import ScoreOptions, ScoreResponse, score_payloads
from service.settings import Settings

router = APIRouter(tags=["scoring"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
SCORE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": (
        f"One or more frames (PNG, JPEG or WebP): multipart parts named `{FILES_FIELD}` (key = filename), "
        "one raw image body (key `0`), or JSON with base64 images and optional keys."
    ),
    "content": {
        MULTIPART: {
            "schema": {
                "type": "object",
                "required": [FILES_FIELD],
                "properties": {
                    FILES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}
                },
            },
        },
        **{kind: _BINARY for kind in RAW_IMAGE_TYPES},
        JSON: {"schema": {"$ref": "#/components/schemas/ScoreJSONRequest"}},
    },
}
_SOURCES = {MULTIPART: "multipart", JSON: "json"}


@router.post(
    "/score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,
    responses=error_responses(401, 403, 404, 408, 413, 415, 422, 429, 500, 503),
    openapi_extra={"requestBody": SCORE_REQUEST_BODY},
    dependencies=[Depends(require_score)],
)
async def score(
    request: Request,
    pool: Annotated[ModelPool, Depends(get_pool)],
    settings: Annotated[Settings, Depends(get_app_settings)],
    store: Annotated[Any, Depends(get_store)],
    model: Annotated[str | None, Query(max_length=200, description="model name; default: configured")] = None,
    version: Annotated[int | None, Query(ge=1, description="model version; default: highest")] = None,
    maps: Annotated[
        bool, Query(description="add each frame's anomaly map (base64 grey PNG, the model input's H x W)")
    ] = False,
) -> Response:
    """Score frames: score, p-value, threshold and edge-case flag per frame; edge cases are stored."""
    payloads = await parse_payloads(
        request,
        max_body_bytes=settings.max_body_bytes,
        max_frames=settings.max_frames_per_request,
        max_json_body_bytes=settings.max_json_body_bytes,
    )
    options = ScoreOptions(
        model=model,
        version=version,
        maps=maps,
        max_pixels=settings.max_pixels_per_frame,
        max_request_pixels=settings.max_pixels_per_request,
        source=_SOURCES.get(media_type(request), "raw"),
        deadline_s=settings.request_deadline_s,
        decoder=getattr(request.app.state, "decoder", None),
    )
    result = await score_payloads(pool, payloads, options, store)
    # Serialised here, once: returning the model would make FastAPI validate it a second time.
    return Response(result.model_dump_json(exclude_none=True), media_type="application/json")
