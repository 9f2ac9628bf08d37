"""The header-read timeout (``slhf_server.header_timeout``) on a real uvicorn over raw sockets:
a client that sends its headers too slowly gets a 408 envelope and a closed connection at the
bound; one within the bound, and a kept-alive connection's next request, are served."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI

from slhf.launcher import free_port
from slhf_server.header_timeout import header_timeout_protocol

TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ok": "yes"}

    port = free_port()
    config = uvicorn.Config(
        app, port=port, log_level="warning", http=header_timeout_protocol(TIMEOUT_S)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield port
    server.should_exit = True
    thread.join(5)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_headers_get_a_408_and_the_connection_closed_at_the_bound(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        start = time.perf_counter()
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        raw = _read_all(sock)
        elapsed = time.perf_counter() - start
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 1.0
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["code"] == "header_timeout"


def test_a_silent_connection_is_closed_at_the_bound(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        start = time.perf_counter()
        raw = _read_all(sock)
        assert raw.startswith(b"HTTP/1.1 408 ") and time.perf_counter() - start < TIMEOUT_S + 1


def test_headers_dripped_within_the_bound_are_served_and_the_next_request_too(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for part in (b"GET /ping HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            sock.sendall(part)
            time.sleep(TIMEOUT_S / 5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(TIMEOUT_S * 1.5)  # idle between requests: not a header read
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /ping HTTP/1.1\r\n")  # the next request's headers stall
        start = time.perf_counter()
        raw = _read_all(sock)
        assert raw.startswith(b"HTTP/1.1 408 ") and time.perf_counter() - start < TIMEOUT_S + 1
