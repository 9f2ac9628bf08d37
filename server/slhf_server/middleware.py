"""Pure ASGI middleware (no ``BaseHTTPMiddleware``, so streamed bodies pass through untouched).

Outermost first:

1. ``RequestContextMiddleware`` -- the request id (the client's ``X-Request-Id`` or a fresh
   one) in a contextvar and on every response; requests and latency by route and status; one
   access log line; an unexpected exception becomes a 500 envelope that still carries the id.
2. ``BodyLimitMiddleware`` -- bodies over ``SLHF_MAX_BODY_BYTES`` get a 413; a body not complete
   within ``SLHF_BODY_TIMEOUT_S`` gets a 408 and the connection is closed.
3. ``AuthMiddleware`` -- ``Authorization: Bearer <key>`` on every route but the open ones.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slhf_server.errors import (
    AuthenticationError,
    PayloadTooLargeError,
    RequestTimeoutError,
    error_response,
    unexpected_error,
)
from slhf_server.logs import request_id_var
from slhf_server.metrics import ServiceMetrics
from slhf_server.tracing import Tracing, request_headers

logger = logging.getLogger("slhf.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _route_label(scope: Scope) -> str:
    """The matched route's path template (low cardinality); "other" for unknown paths."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "other"


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        tracing: Tracing | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing
        """With traces on, each request's span (slhf_server.tracing)."""
        self.headers = list(headers)
        """Added to every response (``x-slhf-api-server`` with several API processes)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _REQUEST_ID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        token = request_id_var.set(rid)
        status = 499  # until a response starts: the client left (or the task was cancelled)
        started = time.perf_counter()
        traced = None
        if self.tracing is not None and str(scope.get("path", "")).startswith("/v1/"):
            headers = request_headers(scope.get("headers", []))
            traced = self.tracing.start_request(scope["method"], scope["path"], headers, rid)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                headers += self.headers
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.exception("unhandled error: %s", exc)
            if status == 499:
                status = 500
                response = error_response(unexpected_error(exc))
                await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_label(scope)
            self.metrics.child(self.metrics.requests, route, str(status)).inc()
            self.metrics.child(self.metrics.request_latency, route).observe(elapsed)
            logger.info(
                "%s %s %d %.1f ms",
                scope.get("method"),
                scope.get("path"),
                status,
                elapsed * 1000,
                extra={"status": status, "route": route, "duration_ms": round(elapsed * 1000, 1)},
            )
            if traced is not None:
                traced.end(scope["method"], route, status)
            request_id_var.reset(token)


class _BodyTooLarge(Exception):
    def __init__(self, size: str) -> None:
        self.size = size


class BodyLimitMiddleware:
    """Reads the body up front: a 413 when it is over ``max_bytes``, a 408 (and the connection
    closed) when it is not complete within ``timeout_s``."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, f"{int(declared):,}")
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            await self._timed_out(scope, receive, send)
            return
        except _BodyTooLarge as e:
            await self._reject(scope, receive, send, e.size)
            return
        if body is None:  # the client left
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body; None when the client disconnected."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                raise _BodyTooLarge(f"more than {self.max_bytes:,}")
        return b"".join(chunks)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        response = error_response(
            PayloadTooLargeError(
                f"request body has {size} bytes; the limit is {self.max_bytes:,} "
                "(SLHF_MAX_BODY_BYTES)",
                code="body_too_large",
            )
        )
        await response(scope, receive, send)

    async def _timed_out(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            RequestTimeoutError(
                f"the request body was not complete within {self.timeout_s:g} s "
                "(SLHF_BODY_TIMEOUT_S); the connection is closed",
                code="body_timeout",
                headers={"Connection": "close"},
            )
        )
        await response(scope, receive, send)


class AuthMiddleware:
    """``Authorization: Bearer <key>`` against the configured keys, in constant time.

    Under ``browser_prefix`` (the playground's pages) HTTP Basic with the key as the password is
    accepted too, and a 401 asks for it, so a browser shows its login prompt."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        open_paths: Sequence[str],
        browser_prefix: str | None = None,
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = frozenset(open_paths)
        self.browser_prefix = browser_prefix

    def _browser_page(self, scope: Scope) -> bool:
        prefix = self.browser_prefix
        path = str(scope.get("path", ""))
        return prefix is not None and (path == prefix or path.startswith(prefix + "/"))

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, given = header.partition(" ")
        scheme = scheme.lower()
        candidate = given.strip().encode("latin-1", "replace")
        if scheme == "basic" and self._browser_page(scope):
            try:
                candidate = base64.b64decode(candidate, validate=True).partition(b":")[2]
            except ValueError:
                candidate = b""
            scheme = "bearer"
        ok = False
        for key in self.keys:  # compare with every key: the time does not tell which matched
            ok |= hmac.compare_digest(candidate, key)
        return ok and scheme == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys
            or scope.get("path") in self.open_paths
            or self._authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        challenge = 'Basic realm="SLHF playground"' if self._browser_page(scope) else "Bearer"
        response = error_response(
            AuthenticationError(
                "missing or invalid API key; send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": challenge},
            )
        )
        await response(scope, receive, send)
