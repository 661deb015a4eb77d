"""JSON-lines logging for the service: a formatter, the handler and uvicorn's ``log_config``.

Kept apart from :mod:`service.observability` and light (standard library and orjson only):
uvicorn applies the logging config in each worker before that worker answers its supervisor's
health pings, so importing FastAPI or prometheus-client from here would delay the first pong
(on a loaded machine past uvicorn's 5 s limit, and the worker is killed and respawned).
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from ranker.errors import ConfigError

# The request being served (an object with a ``request_id``), set by the observability
# middleware, so any line logged while serving it names it.
request_context: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "ranker_request", default=None
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ms), ``level``, ``logger``, ``pid``, ``msg``, the
    record's ``fields`` (the request log's keys) and ``exc`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:  # a line written while serving a request (a store warning) names the request
            current = request_context.get()
            if current is not None:
                out["request_id"] = current.request_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def json_stdout_handler() -> logging.Handler:
    """The logging config's one handler: JSON lines on stdout. Built in every worker, so it
    also routes ``warnings.warn`` into logging there (``py.warnings``): a library's deprecation
    notice becomes a JSON line too instead of breaking the stream with plain text."""
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    return handler


def logging_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn's ``log_config``: JSON lines on stdout for
    the service (``ranker.*``), uvicorn and everything else (warnings and up); uvicorn's access
    log is off, the request log replaces it. Uvicorn applies it in every worker.

    Raises:
        ConfigError: ``level`` is not a logging level name.
    """
    name = level.upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ConfigError(
            f"log_level: unknown level {level!r}; use debug, info, warning, error or critical"
        )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stdout": {"()": "service.logs.json_stdout_handler"}},
        "root": {"handlers": ["stdout"], "level": "WARNING"},
        "loggers": {
            "ranker": {"handlers": ["stdout"], "level": name, "propagate": False},
            "uvicorn": {"handlers": ["stdout"], "level": name, "propagate": False},
            "uvicorn.error": {"level": name},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
