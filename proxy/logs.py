"""Log lines: JSON or text, and the request's id and run_id on every line about a request.

The request's identity lives in one ``ContextVar`` holding a small mutable
``RequestContext``: the request-id middleware (``proxy.request_ids``) sets it when a
request arrives, the broker adds the run_id once it has read the body. A mutation
rather than a second ``set``, so the lines logged after it (the access line, from
the middleware, included) see the run_id too. A filter on the handler copies both
onto each record as it is written: nothing is done per request unless a line is.

``log_config`` is the ``logging.config.dictConfig`` that ``serve`` hands to uvicorn,
which applies it in the parent and again in each worker process: every process of
``serve --workers N`` writes the same format.
"""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

LogFormat = Literal["json", "text"]
FORMATS: tuple[LogFormat, ...] = ("json", "text")
LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOGGER = "databroker.access"
ACCESS_FIELDS = ("method", "path", "status", "duration_ms")
"""What an access line carries beyond the message (``extra=`` of the middleware's call)."""


@dataclass(slots=True)
class RequestContext:
    request_id: str
    run_id: uuid.UUID | None = None


CURRENT: ContextVar[RequestContext | None] = ContextVar("databroker_request", default=None)


def bind_run_id(run_id: uuid.UUID) -> None:
    """The request being served works for ``run_id``: every later line about it says so."""
    context = CURRENT.get()
    if context is not None:
        context.run_id = run_id


class RequestFilter(logging.Filter):
    """Copies the current request's id and run_id (None outside a request) onto the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = CURRENT.get()
        record.request_id = context.request_id if context else None
        record.run_id = str(context.run_id) if context and context.run_id else None
        return True


def _context(record: logging.LogRecord) -> dict[str, Any]:
    """The record's request fields and access fields, those that are set."""
    fields = {}
    for name in ("request_id", "run_id", *ACCESS_FIELDS):
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, message, pid, the request's
    fields when there are any, and the traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            **_context(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value…``: for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _context(record)
        if not fields:
            return text
        head, newline, rest = text.partition("\n")  # keep a traceback below the line
        pairs = " ".join(f"{name}={value}" for name, value in fields.items())
        return f"{head} {pairs}{newline}{rest}"


def default_format(database_url: str | None) -> LogFormat:
    """JSON where a database URL says production, text on a laptop."""
    return "json" if database_url else "text"


def log_config(log_format: LogFormat, level: str, access: bool) -> dict[str, Any]:
    """Every logger of the process (uvicorn's, ours, the root for libraries) to stderr in
    ``log_format``; the access log at INFO when on, whatever ``level`` says. As text,
    uvicorn's own lines keep uvicorn's look. Classes by name: uvicorn pickles the config
    to spawned workers."""
    level = level.upper()
    ours = {"()": f"{__name__}.{'JsonFormatter' if log_format == 'json' else 'TextFormatter'}"}
    uvicorns = ours
    if log_format == "text":
        uvicorns = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"}
    handler = {
        "class": "logging.StreamHandler",
        "filters": ["request"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request": {"()": f"{__name__}.RequestFilter"}},
        "formatters": {
            "databroker": ours,
            "uvicorn": uvicorns,
        },
        "handlers": {
            "stderr": {**handler, "formatter": "databroker"},
            "uvicorn": {**handler, "formatter": "uvicorn"},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "databroker": {"handlers": ["stderr"], "level": level, "propagate": False},
            # Off unless asked: the middleware checks once per request, then skips the line.
            ACCESS_LOGGER: {"level": "INFO" if access else "CRITICAL"},
            "uvicorn": {"handlers": ["uvicorn"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            # Ours replaces it: it has the duration, the request id and the run_id.
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }
