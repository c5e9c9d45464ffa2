"""Log lines a person can read and a machine can follow: `EDGECASE_LOG_FORMAT=text|json`.

Everything goes through the standard library's logging. `logging_config()` is the dictConfig that
`edgecase serve` hands to uvicorn (`log_config=`), so uvicorn applies it in every worker process and
its own loggers (`uvicorn`, `uvicorn.error`) print in the same format as ours. In JSON each line is one
object (python-json-logger) with `time` (ISO 8601, UTC), `level`, `logger`, `message`, `request_id`,
`model`, `version`; access lines (`service.access`) add `method`, `route`, `status` and `duration`
(seconds), and the batcher's lines add `request_ids` (every request in the batch). The request fields
come from `service.request_context` through `RequestContextFilter`, on the handler, so records of
every logger get them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from service.request_context import current_context

LogFormat = Literal["text", "json"]
CONTEXT_FIELDS = ("request_id", "model", "version")
# Extra fields shown at the end of a text line, in this order, when a record has them.
_TEXT_EXTRAS = ("request_id", "request_ids", "model", "version")


class RequestContextFilter(logging.Filter):
    """Adds request_id, model and version of the current request to a record (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_context()
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):  # a value passed with extra= (the batcher's) wins
                setattr(record, name, getattr(context, name) if context is not None else None)
        return True


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line, with the field names above and an ISO 8601 UTC time."""

    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "message", *CONTEXT_FIELDS],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn attaches an ANSI-coloured copy of its message; it has no place in JSON.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [request_id=... model=... version=...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = []
        for name in _TEXT_EXTRAS:
            value = getattr(record, name, None)
            if value is not None and value != []:
                text = ",".join(map(str, value)) if isinstance(value, list) else value
                extras.append(f"{name}={text}")
        return f"{line} [{' '.join(extras)}]" if extras else line


def make_formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonLineFormatter() if log_format == "json" else TextFormatter()


def make_handler(log_format: LogFormat) -> logging.Handler:
    """A stderr handler with the format and the request context filter."""
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(RequestContextFilter())
    return handler


def logging_config(log_format: LogFormat, level: str = "info") -> dict[str, Any]:
    """The dictConfig for a server process: one stderr handler on the root logger, uvicorn's loggers
    propagating to it (uvicorn's access log stays off: `RequestContextMiddleware` writes ours)."""
    level = level.upper()
    # Third-party libraries stay at INFO or above even when we debug (PIL alone logs every PNG chunk):
    # propagated records are filtered by the logger they start at, so ours still pass at DEBUG.
    root_level = max(logging.INFO, logging.getLevelName(level))
    formatter = f"{__name__}.{'JsonLineFormatter' if log_format == 'json' else 'TextFormatter'}"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_context": {"()": f"{__name__}.RequestContextFilter"}},
        "formatters": {"edgecase": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "edgecase",
                "filters": ["request_context"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": logging.getLevelName(root_level)},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": False},
            "service": {"handlers": [], "level": level, "propagate": True},
        },
    }


def configure_service_logging(log_format: LogFormat, level: str) -> None:
    """In the app's lifespan: our INFO lines need a handler even when the app runs under plain
    `uvicorn` (which configures only its own loggers). Leaves an already configured process alone:
    `edgecase serve` has applied `logging_config`, and test runners have their own root handlers."""
    service_log = logging.getLogger("service")
    service_log.setLevel(level.upper())
    if not logging.getLogger().handlers and not service_log.handlers:
        service_log.addHandler(make_handler(log_format))
