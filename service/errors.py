"""The service's exception tree and the one table that maps it to HTTP status codes.

Routes and helpers raise these; `install_error_handlers` turns every one (and FastAPI's own request
validation and routing errors) into the same JSON body, `ErrorBody`. Anything a client sends ends in a
4xx with a reason; a 500 means a bug or a broken model on our side, never bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.request_context import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every error response: a stable machine-readable code plus a sentence a person can act on."""

    error: str = Field(description="stable error code, e.g. 'corrupt_frame' or 'queue_full'")
    detail: str = Field(description="what went wrong, naming the frame, limit or model concerned")
    frame: str | None = Field(default=None, description="key of the offending frame, when there is one")
    request_id: str | None = Field(
        default=None, description="this request's X-Request-ID: quote it when reporting a problem"
    )


class ServiceError(Exception):
    """Base of every error the service answers with a 4xx/5xx; `code` is the ErrorBody.error value."""

    code = "service_error"

    def __init__(self, detail: str, *, frame: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.frame = frame
        self.headers = headers or {}


class BadRequestError(ServiceError):
    """Well-formed HTTP, unusable content (bad JSON, bad base64, no frames)."""

    code = "bad_request"


class CorruptFrameError(BadRequestError):
    """A frame that does not decode; `frame` names it."""

    code = "corrupt_frame"


class UnsupportedFrameFormatError(CorruptFrameError):
    """A frame that is not PNG, JPEG or WebP, or not the format its part's Content-Type declares."""

    code = "unsupported_frame_format"


class PayloadTooLargeError(ServiceError):
    """Body, frame count or pixel count over the configured limit."""

    code = "too_large"


class RequestTimeoutError(ServiceError):
    """The body did not arrive within `body_timeout_s` (a slow or stalled upload)."""

    code = "request_timeout"


class UnsupportedMediaTypeError(ServiceError):
    code = "unsupported_media_type"


class UnauthorizedError(ServiceError):
    code = "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(ServiceError):
    """A valid API key without the scope the route needs (e.g. a scoring key on a review route)."""

    code = "forbidden"


class NotFoundError(ServiceError):
    code = "not_found"


class UnknownModelError(NotFoundError):
    code = "unknown_model"


class QueueFullError(ServiceError):
    """The batcher's bounded queue cannot take these frames now; the client should retry later."""

    code = "queue_full"

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_s))})


class NotReadyError(ServiceError):
    code = "not_ready"

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_s))})


class OverloadedError(QueueFullError):
    """Admission control: too many requests in flight, or the model's queue has no room for a request."""

    code = "overloaded"


class DeadlineExceededError(NotReadyError):
    """An admitted request did not get its frames decoded and scored within `request_deadline_s`."""

    code = "deadline_exceeded"


class InferenceError(ServiceError):
    """The model failed on a batch: our fault (a broken graph), not the client's."""

    code = "inference_failed"


class StoreError(ServiceError):
    """The flagged store could not make an edge case durable, so the request cannot be acknowledged."""

    code = "store_failed"


# The one table. Subclasses are looked up through the MRO, so CorruptFrameError -> 422.
# A frame in a format we do not decode (a TIFF, or a JPEG sent as image/png) is a 422 naming the frame,
# like any frame that does not decode: 415 is about the request's own Content-Type, and one multipart
# request carries frames of several types. Its code, unsupported_frame_format, tells the two apart.
# A client that disconnects mid-upload is counted as 499 (nginx's "client closed request"), not 5xx.
STATUS_CODES: dict[type[ServiceError], int] = {
    BadRequestError: 422,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    RequestTimeoutError: 408,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    QueueFullError: 429,
    NotReadyError: 503,
    InferenceError: 500,
    StoreError: 500,
    ServiceError: 500,
}


def status_code_of(exc: ServiceError) -> int:
    """The HTTP status for an exception, from the closest class in STATUS_CODES."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return 500


def error_response(
    status: int, code: str, detail: str, frame: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The ErrorBody response; carries the request id (body and header) when one is being served."""
    request_id = current_request_id()
    body = ErrorBody(error=code, detail=detail, frame=frame, request_id=request_id)
    if request_id is not None:
        # Also set here because an unhandled exception is answered outside RequestContextMiddleware.
        headers = {**(headers or {}), REQUEST_ID_HEADER: request_id}
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses=` entries for these statuses, all with the ErrorBody schema."""
    descriptions = {
        401: "Missing or wrong API key (send `Authorization: Bearer <key>`)",
        403: "The API key lacks the scope this route needs (score, review or admin)",
        404: "Unknown model, version or resource",
        408: "The request body did not arrive in time",
        413: "Body, frame count, pixels per frame or decoded pixels per request over the limit",
        415: "Unsupported Content-Type",
        422: "Invalid request or a frame that does not decode (the frame is named)",
        429: "Overloaded (too many requests in flight, queue full); retry after Retry-After seconds",
        500: "Server-side failure (a broken model), never caused by the request",
        503: "Models not loaded and warmed yet, or the request's deadline passed; retry after Retry-After",
    }
    return {s: {"model": ErrorBody, "description": descriptions.get(s, "Error")} for s in statuses}


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status = status_code_of(exc)
    if status == 500:  # 503 (not ready) is routine at startup; a 500 is a real problem
        log.error("%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc.detail)
    return error_response(status, exc.code, exc.detail, frame=exc.frame, headers=exc.headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ())) or 'request'}: {err.get('msg', 'invalid')}"
        for err in exc.errors()
    )
    return error_response(422, "invalid_request", problems or "invalid request")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 400:  # FastAPI's "error parsing the body" (bad JSON): a 422 like every other
        return error_response(422, "invalid_request", str(exc.detail), headers=headers)
    # 408/413/499 come from service.limits (raised while the body streams in, even inside FastAPI's
    # own body parsing, which re-raises HTTPException): the same codes as the ServiceErrors above.
    codes = {
        404: "not_found",
        405: "method_not_allowed",
        408: RequestTimeoutError.code,
        413: PayloadTooLargeError.code,
        499: "client_disconnected",
    }
    return error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), headers=headers
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through ErrorBody so the OpenAPI responses describe what clients really get."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
