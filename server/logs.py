"""Structured logs: one JSON object per line, carrying the id of the request being served.

The request id lives in a contextvar set by ``server.middleware.RequestContextMiddleware``
(from the client's ``X-Request-Id`` or a fresh one), so every log line written while serving a
request -- in the routes, the refinement loop or an error handler -- names it. API keys are never
logged: the middleware does not log headers, and nothing below it sees them.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("slhf_request_id", default=None)

# LogRecord attributes that are not "extra" fields passed by the caller.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id"?, ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (int, float, bool, str)) else str(value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain lines with the request id in brackets when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = request_id_var.get()
        return line if rid is None else f"{line} [request_id={rid}]"


def configure_logging(log_format: str) -> None:
    """Put our formatter on the console handlers of the root and uvicorn loggers.

    Only plain ``StreamHandler``s are touched (never pytest's capture handlers), so calling this
    from an app's lifespan is harmless in tests.
    """
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.setFormatter(formatter)
