"""Every error the server answers with, and the one function that renders it.

Code below the routes raises ``SLHFError`` subclasses, all defined here. ``domain_error`` turns
any failure -- a domain error, a template error, an engine failure, FastAPI's validation and HTTP
errors, anything unexpected -- into the domain error the client sees, and ``error_body`` renders
that as the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``. The exception
handlers (``install_error_handlers``) answer with it and the right status; a stream that already
started sends it as its error event (``slhf_server.openai_stream``). A raw FastAPI 422 body never
leaves the server.

``request_rejected`` is the one place where the engine's or a tokenizer's rejection of a request
(the ``REQUEST_REJECTIONS`` exception types) becomes a 400: ``slhf_server.refine`` calls it for
what the engine raises (``slhf_server.vllm_engine`` maps vLLM's errors to those types),
``slhf_server.prompts`` for the tokenizers'. Texts in an envelope are made encodable first, so
an error about a lone surrogate can itself be sent (docs/reliability.md).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slhf_models.serving.templates import TemplateError
from slhf_server.engine import EngineError

logger = logging.getLogger("slhf_server")


class SLHFError(Exception):
    status_code = 500
    error_type = "internal_server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class InvalidRequestError(SLHFError):
    status_code = 400
    error_type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    def __init__(self, message: str, *, param: str | None = "prompt"):
        super().__init__(message, param=param, code="context_length_exceeded")


class ModelNotFoundError(SLHFError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, model: str, available: list[str]):
        super().__init__(
            f"The model `{model}` does not exist. Available models: {', '.join(available)}",
            param="model",
            code="model_not_found",
        )


class ServiceUnavailableError(SLHFError):
    status_code = 503
    error_type = "service_unavailable"


class AuthenticationError(SLHFError):
    status_code = 401
    error_type = "authentication_error"


class RequestTimeoutError(SLHFError):
    """The client did not send its whole request body in time (408)."""

    status_code = 408
    error_type = "invalid_request_error"


class PayloadTooLargeError(SLHFError):
    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(SLHFError):
    """Admission control said no: the in-flight work is at its bound (429, Retry-After)."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int, code: str = "overloaded"):
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class DeadlineExceededError(SLHFError):
    """The deadline passed before the first answer was complete: nothing to return."""

    status_code = 504
    error_type = "timeout_error"


class ClientDisconnectedError(SLHFError):
    """The client went away before the response (logged and counted as 499)."""

    status_code = 499
    error_type = "client_disconnected"


class UpstreamError(SLHFError):
    """The upstream server failed or answered something unusable."""

    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeoutError(SLHFError):
    """The upstream server did not answer within ``SLHF_UPSTREAM_TIMEOUT_S``."""

    status_code = 504
    error_type = "upstream_timeout"


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
"""An HTTP error's ``type`` by status (``HTTPStatusError``)."""


class HTTPStatusError(SLHFError):
    """An HTTP error raised by the framework itself (an unknown route's 404, a 405)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message, headers=headers)
        self.status_code = status
        self.error_type = _STATUS_TYPES.get(status, "invalid_request_error")


# -- rejections by the engine or a tokenizer ----------------------------------------------------
REQUEST_REJECTIONS: tuple[type[Exception], ...] = (ValueError, TypeError, OverflowError)
"""What an engine or a tokenizer raises when a request's values are unusable (``UnicodeError``
is a ``ValueError``): a lone surrogate the tokenizer cannot encode, a number the serializer
cannot pack, a sampling value the engine refuses."""


def request_rejected(exc: BaseException, who: str, param: str | None = None) -> InvalidRequestError:
    """The 400 for a request that ``who`` (an engine, a tokenizer) rejected with ``exc``."""
    logger.warning("%s rejected a request: %s: %s", who, type(exc).__name__, printable(str(exc)))
    return InvalidRequestError(
        f"{who} rejected the request: {type(exc).__name__}: {str(exc)[:500]}",
        param=param,
        code="rejected_by_engine",
    )


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) written as ``\\udXXX``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- the envelope -------------------------------------------------------------------------------
_STATUS_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    429: "rate_limited",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}
"""An error's ``code`` when the raiser names none: always a string, as OpenAI's."""


def default_code(status: int) -> str:
    return _STATUS_CODES.get(status, f"http_{status}")


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\])$")
"""How pydantic names the member of a union in an error's location (``str``, ``list[str]``)."""


def _located(errors: list[Any]) -> list[tuple[list[str], dict[str, Any]]]:
    """Each error with its location as field names (union members left out); a union member's
    wrong-type error is dropped when another member has a more specific error there."""
    located = [
        (
            [
                str(x)
                for x in err.get("loc", ())
                if x != "body" and not (isinstance(x, str) and _UNION_MEMBER.match(x))
            ],
            err,
        )
        for err in errors
    ]

    def shadowed(loc: list[str], err: dict[str, Any]) -> bool:
        return str(err.get("type", "")).endswith("_type") and any(
            o is not err and o_loc[: len(loc)] == loc and not str(o.get("type")).endswith("_type")
            for o_loc, o in located
        )

    return [(loc, err) for loc, err in located if not shadowed(loc, err)]


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence (and the offending field) from pydantic's error list."""
    parts: list[str] = []
    first_param: str | None = None
    for loc, err in _located(list(exc.errors())):
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return f"Malformed JSON body: {ctx.get('error', err.get('msg'))}", None
        if err.get("type") == "missing" and not loc:
            return "Request body is missing; send a JSON object", None
        param = ".".join(loc) or None
        first_param = first_param or param
        msg = str(err.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        parts.append(f"{param}: {msg}" if param else msg)
    return "; ".join(parts) or "Invalid request", first_param


def unexpected_error(exc: BaseException) -> SLHFError:
    """The 500 for a failure nothing expected (its type named, never its message)."""
    return SLHFError(f"Internal server error ({type(exc).__name__})")


def domain_error(exc: Exception) -> SLHFError:
    """The domain error a failure is answered with. An engine failure and an unexpected error are
    logged here."""
    if isinstance(exc, SLHFError):
        return exc
    if isinstance(exc, TemplateError):
        return InvalidRequestError(str(exc), param="messages")
    if isinstance(exc, EngineError):
        logger.error("engine error: %s", exc)
        return ServiceUnavailableError(str(exc), code="engine_error")
    if isinstance(exc, RequestValidationError):
        message, param = _describe_validation(exc)
        return InvalidRequestError(message, param=param)
    if isinstance(exc, StarletteHTTPException):
        headers = dict(exc.headers) if exc.headers else None
        return HTTPStatusError(exc.status_code, str(exc.detail), headers)
    logger.exception("unhandled error: %s", exc)
    return unexpected_error(exc)


def error_body(error: SLHFError) -> dict[str, Any]:
    """The OpenAI error envelope of ``error``: every error answer, and a stream's error event."""
    return {
        "error": {
            "message": printable(error.message),
            "type": error.error_type,
            "param": None if error.param is None else printable(error.param),
            "code": error.code if error.code is not None else default_code(error.status_code),
        }
    }


def error_response(error: SLHFError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure of a route with its envelope (``domain_error``), counting the
    upstream's failures."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = domain_error(exc)
        if error.error_type.startswith("upstream"):
            request.app.state.metrics.upstream_errors.labels(error.error_type).inc()
        return error_response(error)

    for kind in (
        SLHFError,
        TemplateError,
        EngineError,
        RequestValidationError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(kind, handle)
