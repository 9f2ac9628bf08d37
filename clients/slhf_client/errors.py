"""The client's error tree, keyed by HTTP status (as openai-python's).

```
SLHFClientError
├── APIConnectionError          the server could not be reached
│   └── APITimeoutError         no answer within the timeout
└── APIStatusError              the server answered with an error envelope
    ├── BadRequestError         400, 422
    ├── AuthenticationError     401
    ├── PermissionDeniedError   403
    ├── NotFoundError           404 (unknown model)
    ├── ConflictError           409
    ├── RateLimitError          429 (admission queue full)
    └── ServerError             5xx (502/504: upstream; 503: engine dead or draining)
```
A failure after a stream started arrives as an ``{"error": ...}`` event and is raised as the
class its ``type`` names (``status_code`` is then ``None`` unless the envelope's code is one).
"""

from __future__ import annotations


class SLHFClientError(Exception):
    """Base of every error this client raises."""


class APIConnectionError(SLHFClientError):
    def __init__(self, message: str = "Connection error") -> None:
        super().__init__(message)
        self.message = message


class APITimeoutError(APIConnectionError):
    def __init__(self, message: str = "Request timed out") -> None:
        super().__init__(message)


class APIStatusError(SLHFClientError):
    """An error envelope ``{"error": {"message", "type", "param", "code"}}`` from the server."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        body: object = None,
    ) -> None:
        super().__init__(f"{status_code} {message}" if status_code else message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.body = body


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class ServerError(APIStatusError):
    pass


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: BadRequestError,
    429: RateLimitError,
}

_BY_TYPE: dict[str, type[APIStatusError]] = {
    "invalid_request_error": BadRequestError,
    "authentication_error": AuthenticationError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "rate_limit_error": RateLimitError,
    "service_unavailable": ServerError,
    "internal_server_error": ServerError,
    "upstream_error": ServerError,
}


def error_class(status_code: int | None, error_type: str | None) -> type[APIStatusError]:
    if status_code is not None:
        if status_code in _BY_STATUS:
            return _BY_STATUS[status_code]
        if status_code >= 500:
            return ServerError
    return _BY_TYPE.get(error_type or "", APIStatusError)


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def status_error(status_code: int | None, body: object, fallback: str = "") -> APIStatusError:
    """The error for an HTTP status and a (possibly non-envelope) body."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        text = fallback or (str(body) if body is not None else "")
        return error_class(status_code, None)(
            text or f"HTTP {status_code}", status_code=status_code, body=body
        )
    raw_code = err.get("code")
    code = raw_code if isinstance(raw_code, int | str) else _str_or_none(raw_code)
    if status_code is None and isinstance(code, int):
        status_code = code
    error_type = _str_or_none(err.get("type"))
    return error_class(status_code, error_type)(
        str(err.get("message") or f"HTTP {status_code}"),
        status_code=status_code,
        type=error_type,
        param=_str_or_none(err.get("param")),
        code=code,
        body=body,
    )
