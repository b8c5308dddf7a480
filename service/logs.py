"""Structured logs: one JSON object per line, carrying the request id."""

from __future__ import annotations

import contextvars
import logging
import sys

from pythonjsonlogger.json import JsonFormatter

#: The id of the request being served (X-Request-ID, or one we made up).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure(json_logs: bool = True, level: int = logging.INFO) -> None:
    """Route our loggers and uvicorn's through one handler (JSON unless disabled)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestId())
    if json_logs:
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{request_id}",
                style="{",
                rename_fields={"asctime": "ts", "levelname": "level"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    for name in ("service", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # Our access log (with request id, status and duration) replaces uvicorn's.
    logging.getLogger("uvicorn.access").disabled = True
