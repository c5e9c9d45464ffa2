"""HTTP routes of the flagged-frame store: list flags, fetch a flagged image, record a review.

Thin on purpose: the store (a `service.flag_store.FlagStore`: SQLite + files, or PostgreSQL + an object
store; built in the app's lifespan and kept on `app.state.store`) does the work; these routes validate
input, shape responses with pydantic models (so the OpenAPI spec says exactly what clients get) and map
a missing flag to 404. Handlers are plain
`def`s: FastAPI runs them in its thread pool, where blocking database and object-store reads belong.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.auth import KeyFirstRoute, require_review
from service.errors import NotFoundError, NotReadyError, error_responses
from service.flag_store import (
    FlaggedNotFoundError,
    FlaggedRecord,
    FlagStore,
    ImageMissingError,
    ReviewLabel,
    ReviewState,
)
from service.image_files import MEDIA_TYPES

# Every route needs the `review` scope. KeyFirstRoute: the review route has a JSON body, and the key
# must be checked before it is read. On the router itself (not at include time) so each route carries it.
router = APIRouter(
    tags=["flagged"],
    route_class=KeyFirstRoute,
    dependencies=[Depends(require_review)],
    responses=error_responses(401, 403),
)

MAX_PAGE = 1000
IMAGE_MEDIA_TYPES = sorted(set(MEDIA_TYPES.values()))
_MAX_ID = 2**63 - 1  # SQLite's INTEGER range: larger ids cannot exist, and must not reach the driver


_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_datetime_only(value: object) -> object:
    """Pydantic would also take unix seconds or a bare date; the spec promises ISO-8601 date-times."""
    if isinstance(value, str) and not _ISO_DATETIME.match(value.strip()):
        raise ValueError("expected an ISO-8601 date-time such as 2026-01-31T08:00:00Z")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_datetime_only)]


class FlaggedItem(BaseModel):
    """One flagged frame as the API shows it."""

    id: int = Field(description="flag id (one per flag; several flags may share an image)")
    created_at: datetime = Field(description="when the frame was flagged (UTC)")
    model: str
    version: int
    score: float
    p_value: float = Field(description="conformal p-value against the model's calibration normals")
    key: str | None = Field(description="the client's key for the frame, if it sent one")
    metadata: dict[str, Any] = Field(description="client metadata sent with the frame")
    image_sha256: str = Field(description="content address of the stored image")
    media_type: str = Field(description="media type of GET /flagged/{id}/image")
    image_url: str = Field(description="path of the image, relative to the service root")
    review: ReviewState
    reviewed_at: datetime | None


class FlaggedPage(BaseModel):
    """One page of flags, newest first, and how many match the filters in all."""

    items: list[FlaggedItem]
    total: int = Field(description="flags matching the filters, on every page")
    limit: int
    offset: int


class ReviewRequest(BaseModel):
    """A reviewer's verdict on a flagged frame."""

    model_config = ConfigDict(extra="forbid")

    label: ReviewLabel = Field(description="edge_case (a true edge case) or normal (a false alarm)")


def item_of(record: FlaggedRecord) -> FlaggedItem:
    """The API view of a stored flag."""
    return FlaggedItem(
        id=record.id,
        created_at=record.created_at,
        model=record.model,
        version=record.version,
        score=record.score,
        p_value=record.p_value,
        key=record.key,
        metadata=record.metadata,
        image_sha256=record.image_sha256,
        media_type=record.media_type,
        image_url=f"/flagged/{record.id}/image",
        review=record.review,
        reviewed_at=record.reviewed_at,
    )


def get_store(request: Request) -> FlagStore:
    """The app's flagged store (tests replace this dependency)."""
    store: FlagStore | None = getattr(request.app.state, "store", None)
    if store is None:
        raise NotReadyError("the flagged-frame store is not open yet")
    return store


StoreDep = Annotated[FlagStore, Depends(get_store)]
FlagId = Annotated[int, Path(ge=1, le=_MAX_ID, description="flag id")]


@router.get("/flagged", response_model=FlaggedPage, responses=error_responses(401, 422, 503))
def list_flagged(
    store: StoreDep,
    model: Annotated[str | None, Query(max_length=256, description="model name")] = None,
    version: Annotated[int | None, Query(ge=1, le=_MAX_ID, description="model version")] = None,
    since: Annotated[
        IsoDateTime | None, Query(description="flagged at or after (ISO-8601; UTC if no zone)")
    ] = None,
    until: Annotated[
        IsoDateTime | None, Query(description="flagged before (ISO-8601; UTC if no zone)")
    ] = None,
    review: Annotated[ReviewState | None, Query(description="review state")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=_MAX_ID)] = 0,
) -> FlaggedPage:
    """List flagged frames, newest first, filtered by model, version, time and review state."""
    records, total = store.list(
        model=model, version=version, since=since, until=until, review=review, limit=limit, offset=offset
    )
    return FlaggedPage(items=[item_of(r) for r in records], total=total, limit=limit, offset=offset)


@router.get(
    "/flagged/{flag_id}/image",
    response_class=Response,
    responses={
        200: {
            "content": {media: {} for media in sorted(set(MEDIA_TYPES.values()))},
            "description": "The image",
        },
        **error_responses(401, 404, 422, 503),
    },
)
def get_flagged_image(flag_id: FlagId, store: StoreDep) -> Response:
    """The flagged frame's image bytes, as they were stored."""
    try:
        record = store.get(flag_id)
        data = store.image_of(record)
    except FlaggedNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc
    except ImageMissingError as exc:  # only if someone deleted images under the store by hand
        raise NotFoundError(str(exc)) from exc
    filename = f"flag-{record.id}.{record.image_ext}"
    return Response(
        data,
        media_type=record.media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post(
    "/flagged/{flag_id}/review", response_model=FlaggedItem, responses=error_responses(401, 404, 422, 503)
)
def review_flagged(flag_id: FlagId, body: ReviewRequest, store: StoreDep) -> FlaggedItem:
    """Label a flagged frame as a true edge case or as normal."""
    try:
        return item_of(store.review(flag_id, body.label))
    except FlaggedNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc
