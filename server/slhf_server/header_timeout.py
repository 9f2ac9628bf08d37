"""A bound on the time a client takes to send a request's line and headers (uvicorn has none).

uvicorn closes a kept-alive connection that sends nothing for ``--timeout-keep-alive``, but a
fresh connection, or one that has sent part of its headers, may hold its socket and its file
descriptor forever. ``header_timeout_protocol`` subclasses uvicorn's httptools protocol: a timer
starts when the connection opens and when a request begins, and stops when its headers are
complete; when it fires the client gets a 408 with the error envelope and the connection is
closed (docs/reliability.md). The body has its own bound (``SLHF_BODY_TIMEOUT_S``,
``slhf_server.middleware.BodyLimitMiddleware``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from slhf_server.errors import RequestTimeoutError, error_body

logger = logging.getLogger("slhf.access")


def timeout_answer(timeout_s: float) -> bytes:
    """The raw 408 a client too slow with its headers gets before the connection closes."""
    body = json.dumps(
        error_body(
            RequestTimeoutError(
                f"the request line and headers were not complete within {timeout_s:g} s "
                "(SLHF_HEADER_TIMEOUT_S); the connection is closed",
                code="header_timeout",
            )
        )
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a header-read timeout of ``timeout_s``."""
    answer = timeout_answer(timeout_s)

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            logger.info("headers not complete within %.1f s: connection closed", timeout_s)
            self.transport.write(answer)
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
