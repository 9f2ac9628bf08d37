"""A hostile OpenAI-compatible upstream on loopback (docs/reliability.md).

``POST .../chat/completions`` answers according to a keyword in the last message's content, so one
server serves every case to the server under test (which asks it for first answers):

- ``drip``: a valid answer, one byte a second (each read is quick; the whole answer is not);
- ``content-int``, ``content-list``, ``usage-string``, ``usage-list``, ``usage-negative``,
  ``surrogate``: a 200 whose answer has that defect;
- ``huge``: a 200 of 50 MB (``huge-declared``: with its ``Content-Length``);
- ``error``: a 503 with an error envelope;
- anything else: a valid answer.

Every answer stops when the client goes away; ``FakeUpstream.stop`` ends the server thread.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HUGE_BYTES = 50 * 1024 * 1024
DRIP_SECONDS = 20


def completion(content: Any = "Fake upstream answer", usage: Any = "default") -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }
    if usage == "default":
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    body["usage"] = usage
    return body


DEFECTS: dict[str, dict[str, Any]] = {
    "content-int": completion(content=42),
    "content-list": completion(content=["a", "b"]),
    "usage-string": completion(usage="many"),
    "usage-list": completion(usage=[1, 2]),
    "usage-negative": completion(usage={"prompt_tokens": -1, "completion_tokens": 3}),
    "surrogate": completion(content="lone \ud800 surrogate"),
}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        last = (request.get("messages") or [{}])[-1].get("content", "")
        keyword = next((k for k in self.server.keywords if k in last), "")  # type: ignore[attr-defined]
        self.server.seen.append(keyword)  # type: ignore[attr-defined]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client left
            self._answer(keyword)

    def _answer(self, keyword: str) -> None:
        if keyword == "drip":
            body = json.dumps(completion()).encode()
            self._start(200, len(body))
            for i in range(min(len(body), DRIP_SECONDS)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(1.0)
        elif keyword.startswith("huge"):
            self._start(200, HUGE_BYTES if keyword == "huge-declared" else None)
            self._huge()
        elif keyword == "error":
            self._send(503, {"error": {"message": "the fake upstream is overloaded"}})
        else:
            self._send(200, DEFECTS.get(keyword, completion()))

    def _start(self, status: int, length: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as \ud800
        self._start(status, len(raw))
        self.wfile.write(raw)

    def _huge(self) -> None:
        head = b'{"choices": [{"message": {"role": "assistant", "content": "'
        tail = b'"}}]}'
        self.wfile.write(head)
        chunk = b"a" * (1024 * 1024)
        written = len(head) + len(tail)
        while written + len(chunk) <= HUGE_BYTES:
            self.wfile.write(chunk)
            written += len(chunk)
        self.wfile.write(b"a" * (HUGE_BYTES - written) + tail)


KEYWORDS = ("drip", "huge-declared", "huge", "error", *DEFECTS)


class FakeUpstream:
    """The fake upstream, serving on ``127.0.0.1`` in a daemon thread."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.keywords = KEYWORDS  # type: ignore[attr-defined]
        self.server.seen = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def seen(self) -> list[str]:
        return self.server.seen  # type: ignore[attr-defined,no-any-return]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
