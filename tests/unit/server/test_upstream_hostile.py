"""Hostile upstream answers and slow request bodies with a fake engine (docs/reliability.md,
"Hostile upstreams" and "Bounded time and memory per request"): one deadline for the whole upstream
answer (504), strict parsing (502 naming what was wrong), a byte cap and a length cap (502), and a
body read timeout (408, connection closed)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from slhf_server.middleware import BodyLimitMiddleware
from slhf_server.settings import ServerSettings
from slhf_server.upstream import UpstreamClient
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_hardening import make_app
from tests.unit.server.test_routes import assert_envelope

CAP = 64 * 1024
TIMEOUT_S = 0.5
Handler = Callable[[httpx.Request], httpx.Response]


def answer(content: object = "Upstream says hi", usage: object = None, **extra: object) -> dict:
    body: dict = {"choices": [{"message": {"role": "assistant", "content": content}}], **extra}
    if usage is not None:
        body["usage"] = usage
    return body


def raw(body: object) -> httpx.Response:
    return httpx.Response(200, content=json.dumps(body).encode())


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch, engine: ScriptedEngine) -> Callable[..., TestClient]:
    """A client of an app whose upstream is ``handler`` (an httpx mock transport)."""

    def start(handler: Handler) -> TestClient:
        def from_settings(settings: ServerSettings) -> UpstreamClient:
            transport = httpx.MockTransport(handler)
            return UpstreamClient(
                "http://up/v1", "other", timeout_s=TIMEOUT_S, max_bytes=CAP, transport=transport
            )

        monkeypatch.setattr(UpstreamClient, "from_settings", staticmethod(from_settings))
        return TestClient(make_app(engine))

    return start


def ask(client: TestClient) -> httpx.Response:
    body = {"prompt": "x", "rounds": 1, "leader": {"source": "upstream"}}
    return client.post("/v1/refine", json=body)


# -- row 5: one deadline for the whole answer -----------------------------------------------------
class Drip(httpx.AsyncByteStream):
    """A valid answer, one byte every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.body = json.dumps(answer()).encode()
        self.interval = interval

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(len(self.body)):
            await asyncio.sleep(self.interval)
            yield self.body[i : i + 1]


def test_an_upstream_that_drips_is_a_504_at_the_deadline(serve: Callable[..., TestClient]) -> None:
    # each byte arrives well within any per-read timeout; the whole answer takes ~8 s
    with serve(lambda r: httpx.Response(200, stream=Drip(0.1))) as client:
        t0 = time.monotonic()
        r = ask(client)
        elapsed = time.monotonic() - t0
        err = assert_envelope(r, 504, f"within {TIMEOUT_S:g} s", "whole answer")
        assert err["code"] == "upstream_timeout" and elapsed < TIMEOUT_S + 2.0
        metrics = client.get("/metrics").text
    assert 'slhf_upstream_errors_total{code="upstream_timeout"} 1.0' in metrics


# -- row 6: strict parsing ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (answer(content=42), "choices.0.message.content"),
        (answer(content=["a", "b"]), "choices.0.message.content"),
        (answer(usage="lots"), "usage"),
        (answer(usage=[1, 2]), "usage"),
        (answer(usage={"prompt_tokens": -5, "completion_tokens": 3}), "usage.prompt_tokens"),
        (answer(usage={"prompt_tokens": 1, "completion_tokens": 2**70}), "completion_tokens"),
        (answer(usage={"prompt_tokens": "5"}), "usage.prompt_tokens"),
        (answer(content="lone \ud800 surrogate"), "Invalid JSON"),  # a lone \\ud800 escape
        ({"choices": []}, "choices"),
        ({"choices": "none"}, "choices"),
        ({"choices": [{"text": "completion, not chat"}]}, "choices.0.message"),
        ([1, 2, 3], "body"),
        ("just a string", "body"),
    ],
)
def test_an_unusable_upstream_answer_is_a_502_naming_what_was_wrong(
    serve: Callable[..., TestClient], engine: ScriptedEngine, body: object, fragment: str
) -> None:
    with serve(lambda r: raw(body)) as client:
        err = assert_envelope(ask(client), 502, "not a chat completion", fragment)
        assert err["code"] == "upstream_invalid_answer"
        assert client.get("/health").status_code == 200
    assert not engine.calls  # nothing was refined


def test_invalid_json_and_odd_bytes_are_502s(serve: Callable[..., TestClient]) -> None:
    for content in (b"not json", b'{"choices": [', b"\xff\xfe\x00", b""):
        with serve(lambda r, c=content: httpx.Response(200, content=c)) as client:
            assert_envelope(ask(client), 502, "not a chat completion")


def test_null_content_and_missing_usage_are_accepted(
    serve: Callable[..., TestClient], engine: ScriptedEngine
) -> None:
    with serve(lambda r: raw(answer(content=None))) as client:
        out = ask(client).json()
    assert out["leader"]["text"] == "" and out["leader"]["usage"]["total_tokens"] == 0


@pytest.mark.parametrize("length", [2_000, 1_000_000])
def test_an_upstream_error_message_is_quoted_safely_and_briefly(
    serve: Callable[..., TestClient], length: int
) -> None:
    body = json.dumps({"error": {"message": "overloaded \ud800" + "x" * length}}).encode()
    with serve(lambda r: httpx.Response(503, content=body)) as client:
        err = assert_envelope(ask(client), 502, "answered 503: ", "overloaded \\ud800")
    assert len(err["message"]) < 1000


# -- row 7: byte cap and length cap ---------------------------------------------------------------
def test_an_answer_over_the_byte_cap_is_a_502(serve: Callable[..., TestClient]) -> None:
    big = json.dumps(answer(content="a" * (10 * CAP))).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for c in chunks():
                yield c

    with serve(lambda r: httpx.Response(200, stream=Stream())) as client:  # no Content-Length
        err = assert_envelope(ask(client), 502, f"more than {CAP:,} bytes", "MAX_BYTES")
        assert err["code"] == "upstream_too_large"
    with serve(lambda r: httpx.Response(200, content=big)) as client:  # declared up front
        assert_envelope(ask(client), 502, f"{len(big):,} bytes")


def test_an_answer_longer_than_the_follower_context_is_a_502_before_tokenizing(
    serve: Callable[..., TestClient], engine: ScriptedEngine
) -> None:
    # context 512 tokens: at most 512 x 32 = 16,384 characters are tokenized
    with serve(lambda r: raw(answer(content="w " * 9000))) as client:
        err = assert_envelope(ask(client), 502, "18,000 characters", "512 tokens")
        assert err["code"] == "upstream_answer_too_long"
    assert not engine.calls


# -- row 8: a body that never completes -----------------------------------------------------------
async def _partial_body(timeout_s: float) -> tuple[list[dict], float]:
    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        raise AssertionError("the app must not run without the whole body")

    middleware = BodyLimitMiddleware(app, max_bytes=4096, timeout_s=timeout_s)  # type: ignore[arg-type]
    sent: list[dict] = []
    parts = iter([{"type": "http.request", "body": b'{"prompt": ', "more_body": True}])

    async def receive() -> dict:
        part = next(parts, None)
        if part is None:
            await asyncio.sleep(3600)  # the client never sends the rest
        return part  # type: ignore[return-value]

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/refine",
        "headers": [(b"content-length", b"100")],
    }
    t0 = time.monotonic()
    await middleware(scope, receive, send)  # type: ignore[arg-type]
    return sent, time.monotonic() - t0


def test_a_body_that_never_completes_is_a_408_that_closes_the_connection() -> None:
    sent, elapsed = asyncio.run(_partial_body(timeout_s=0.3))
    assert 0.25 < elapsed < 2.0
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    err = json.loads(sent[1]["body"])["error"]
    assert err["code"] == "body_timeout" and "SLHF_BODY_TIMEOUT_S" in err["message"]


def test_body_timeout_is_a_setting(engine: ScriptedEngine) -> None:
    app = make_app(engine, body_timeout_s=7.5)
    with TestClient(app) as client:
        assert client.post("/v1/refine", json={"prompt": "x"}).status_code == 200
    layer: object = app.middleware_stack
    timeouts = []
    while layer is not None:
        if isinstance(layer, BodyLimitMiddleware):
            timeouts.append(layer.timeout_s)
        layer = getattr(layer, "app", None)
    assert timeouts == [7.5]
