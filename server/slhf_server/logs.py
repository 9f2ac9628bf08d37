"""Structured logs: one JSON object per line, carrying the id of the request being served.

With ``SLHF_LOG_FORMAT=json`` every line the server writes is one JSON object: ours, uvicorn's
(its loggers propagate to our root handler), vLLM's (``VLLM_LOGGING_CONFIG_PATH`` names a
logging config using ``JsonFormatter``, inherited by vLLM's engine processes), Python warnings
and every other library's console handler (restyled once the engine has loaded). uvicorn's
``color_message`` (the message with ANSI colour codes) is left out.

The request id lives in a contextvar set by ``slhf_server.middleware.RequestContextMiddleware``
(from the client's ``X-Request-Id`` or a fresh one), so every log line written while serving a
request -- in the routes, the refinement loop or an error handler -- names it. API keys are never
logged: the middleware does not log headers, and nothing below it sees them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextvars import ContextVar
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("slhf_request_id", default=None)

_api_server: dict[str, int] = {}
"""With several API processes (``SLHF_API_SERVERS``): this one's index and pid, on every line."""


def name_api_server(index: int) -> None:
    """Mark every line this process logs from now on with its API process index and pid."""
    _api_server.update(api_server=index, pid=os.getpid())


# LogRecord attributes that are not "extra" fields passed by the caller.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with ANSI colours
}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id"?, "api_server"?, "pid"?, ...extra}``
    on one line."""

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
        entry.update(_api_server)
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
        if _api_server:
            line = f"{line} [api_server={_api_server['api_server']} pid={_api_server['pid']}]"
        rid = request_id_var.get()
        return line if rid is None else f"{line} [request_id={rid}]"


def _formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def restyle_handlers(log_format: str) -> None:
    """Put our formatter on every plain console handler of the root and of every library logger
    that has its own (uvicorn, transformers, ...). Only plain ``StreamHandler``s are touched
    (never pytest's capture handlers), so calling this from an app's lifespan is harmless."""
    formatter = _formatter(log_format)
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if type(handler) is logging.StreamHandler:
                handler.setFormatter(formatter)


def _vllm_logging_config(level: str) -> str:
    """A logging config file for vLLM (``VLLM_LOGGING_CONFIG_PATH``): its loggers write JSON."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"slhf": {"()": "slhf_server.logs.JsonFormatter"}},
        "handlers": {
            "slhf": {
                "class": "logging.StreamHandler",
                "formatter": "slhf",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {"vllm": {"handlers": ["slhf"], "level": level, "propagate": False}},
    }
    fd, path = tempfile.mkstemp(prefix="slhf-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    return path


def configure_logging(log_format: str, log_level: str = "info") -> dict[str, Any]:
    """Configure the process's logging before anything logs; return uvicorn's ``log_config``.

    One root handler on stderr with our formatter; uvicorn's loggers propagate to it; Python
    warnings become log records; with "json", vLLM is told to log through ``JsonFormatter``.
    """
    level = log_level.upper()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(_formatter(log_format))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    if log_format == "json" and "VLLM_LOGGING_CONFIG_PATH" not in os.environ:
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = _vllm_logging_config(level)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            name: {"handlers": [], "level": level, "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
