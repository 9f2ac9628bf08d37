"""OpenTelemetry traces with a fake engine and the SDK's in-memory exporter: the span tree of a
request (request -> one span per round, or the upstream call), its attributes, the caller's
``traceparent`` adopted, each round's context handed to the engine, and nothing when off."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from slhf.launcher import clean_env, serve_command
from slhf_server import tracing
from slhf_server.app import create_app
from slhf_server.engine import Generation, GenerationParams
from slhf_server.settings import ServerSettings
from slhf_server.tracing import Tracing, TracingError, traces_url
from slhf_server.upstream import UpstreamClient
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_routes import WEIGHTS

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


class HeaderRecordingEngine(ScriptedEngine):
    """Records the trace context the engine would hand to vLLM, per engine request id."""

    def __init__(self) -> None:
        super().__init__(numbered_script, context=512)
        self.headers: dict[str, dict[str, str] | None] = {}

    async def generate(
        self, role: str, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> Generation:
        self.headers[request_id] = tracing.trace_headers()
        return await super().generate(role, prompt_token_ids, params, request_id)  # type: ignore[arg-type]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def engine() -> HeaderRecordingEngine:
    return HeaderRecordingEngine()


def _app(engine: ScriptedEngine, exporter: InMemorySpanExporter | None) -> TestClient:
    traced = None
    if exporter is not None:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        traced = Tracing(provider)
    app = create_app(
        ServerSettings(max_rounds=4),
        weights=WEIGHTS,
        engine_factory=lambda w, s: engine,
        tracing=traced,
    )
    return TestClient(app)


@pytest.fixture
def client(engine: HeaderRecordingEngine, exporter: InMemorySpanExporter) -> Iterator[TestClient]:
    with _app(engine, exporter) as c:
        yield c


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted(
        (s for s in spans if s.name == name), key=lambda s: s.attributes.get("slhf.round", 0)
    )


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def test_a_two_round_refine_is_a_request_span_over_one_span_per_round(
    client: TestClient, exporter: InMemorySpanExporter
) -> None:
    r = client.post("/v1/refine", json={"prompt": "Explain gravity", "rounds": 2})
    assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, "POST /v1/refine")
    (leader,) = by_name(spans, "slhf.leader")
    followers = by_name(spans, "slhf.follower")
    assert len(spans) == 4 and len(followers) == 2
    assert request.kind == SpanKind.SERVER and request.parent is None
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["http.route"] == "/v1/refine"
    assert request.attributes["slhf.request_id"] == r.headers["x-request-id"]
    assert request.attributes["gen_ai.request.model"] == "fake-slhf"
    assert request.attributes["gen_ai.response.id"] == r.json()["id"]
    assert request.attributes["slhf.rounds"] == 2
    (event,) = request.events
    assert event.name == "slhf.choice.finished"
    assert event.attributes["slhf.stopped_reason"] == "max_rounds"
    assert event.attributes["slhf.rounds_done"] == 2
    assert event.attributes["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    body = r.json()
    for span, role, i, step in [
        (leader, "leader", 0, body["leader"]),
        (followers[0], "follower", 1, body["rounds"][0]),
        (followers[1], "follower", 2, body["rounds"][1]),
    ]:
        assert span.parent is not None and span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        a = span.attributes
        assert (a["slhf.role"], a["slhf.round"]) == (role, i)
        assert a["slhf.engine_request_id"] == f"{body['id']}-{i}"
        assert a["gen_ai.usage.input_tokens"] == step["usage"]["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == step["usage"]["completion_tokens"]
        assert a["gen_ai.usage.cache_read.input_tokens"] == 0  # the fake reports no cache
        assert a["gen_ai.response.finish_reasons"] == (step["finish_reason"],)
        assert a["gen_ai.request.max_tokens"] >= 1
    # rounds run one after another inside the request
    assert request.start_time <= leader.start_time <= leader.end_time <= followers[0].start_time
    assert followers[1].end_time <= request.end_time


def test_the_callers_traceparent_is_the_request_spans_parent(
    client: TestClient, exporter: InMemorySpanExporter
) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "n": 2},
        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc"},
    )
    assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, "POST /v1/chat/completions")
    assert hexid(request.context.trace_id, 32) == CALLER_TRACE
    assert request.parent is not None and hexid(request.parent.span_id, 16) == CALLER_SPAN
    assert request.attributes["gen_ai.request.choice.count"] == 2
    assert len(request.events) == 2  # one per choice
    assert {hexid(s.context.trace_id, 32) for s in spans} == {CALLER_TRACE}
    assert len(by_name(spans, "slhf.leader")) == 2  # each choice's round 0
    assert all(s.context.trace_state.get("vendor") == "abc" for s in spans)


def test_each_round_hands_its_own_context_to_the_engine(
    client: TestClient, engine: HeaderRecordingEngine, exporter: InMemorySpanExporter
) -> None:
    r = client.post("/v1/refine", json={"prompt": "x", "rounds": 1})
    assert r.status_code == 200, r.text
    spans = {s.attributes.get("slhf.engine_request_id"): s for s in exporter.get_finished_spans()}
    assert len(engine.headers) == 2
    for request_id, headers in engine.headers.items():
        span = spans[request_id]
        assert headers is not None
        trace_id, span_id = headers["traceparent"].split("-")[1:3]
        assert trace_id == hexid(span.context.trace_id, 32)
        assert span_id == hexid(span.context.span_id, 16)


def test_a_streamed_request_traces_its_rounds_too(
    client: TestClient, exporter: InMemorySpanExporter
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.read().decode().rstrip().endswith("data: [DONE]")
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, "POST /v1/chat/completions")
    rounds = by_name(spans, "slhf.leader") + by_name(spans, "slhf.follower")
    assert len(rounds) == 3  # the manifest's 2 rounds
    assert all(s.parent is not None and s.parent.span_id == request.context.span_id for s in rounds)
    assert request.events[0].attributes["slhf.stopped_reason"] == "max_rounds"


def test_errors_are_traced_and_health_is_not(
    client: TestClient, exporter: InMemorySpanExporter
) -> None:
    assert client.get("/health").status_code == 200
    assert client.post("/v1/refine", json={"prompt": "x", "rounds": 99}).status_code == 400
    (request,) = exporter.get_finished_spans()
    assert request.name == "POST /v1/refine"
    assert request.attributes["http.response.status_code"] == 400
    assert request.status.status_code == StatusCode.UNSET  # a 4xx is the caller's error


def test_the_upstream_call_is_a_client_span_and_carries_the_context(
    monkeypatch: pytest.MonkeyPatch, exporter: InMemorySpanExporter
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = {"choices": [{"message": {"content": "upstream answer"}}]}
        return httpx.Response(200, content=json.dumps(answer).encode())

    def from_settings(settings: ServerSettings) -> UpstreamClient:
        transport = httpx.MockTransport(handler)
        return UpstreamClient("http://up.example:8001/v1", "other", transport=transport)

    monkeypatch.setattr(UpstreamClient, "from_settings", staticmethod(from_settings))
    with _app(ScriptedEngine(numbered_script, context=512), exporter) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "fake-slhf@upstream", "messages": [{"role": "user", "content": "q"}]},
        )
    assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, "POST /v1/chat/completions")
    (upstream,) = by_name(spans, "slhf.upstream")
    assert not by_name(spans, "slhf.leader") and len(by_name(spans, "slhf.follower")) == 2
    assert upstream.kind == SpanKind.CLIENT
    assert upstream.parent is not None and upstream.parent.span_id == request.context.span_id
    a = upstream.attributes
    assert (a["server.address"], a["server.port"]) == ("up.example", 8001)
    assert a["http.response.status_code"] == 200 and a["gen_ai.request.model"] == "other"
    (call,) = seen
    trace_id, span_id = call.headers["traceparent"].split("-")[1:3]
    assert (trace_id, span_id) == (
        hexid(upstream.context.trace_id, 32),
        hexid(upstream.context.span_id, 16),
    )


def test_tracing_is_off_unless_an_endpoint_is_set(engine: HeaderRecordingEngine) -> None:
    assert Tracing.from_settings(ServerSettings()) is None
    assert Tracing.from_settings(ServerSettings(otlp_traces_endpoint=" ")) is None
    with _app(engine, None) as c:
        assert c.post("/v1/refine", json={"prompt": "x", "rounds": 1}).status_code == 200
    assert list(engine.headers.values()) == [None, None]
    assert tracing.trace_headers() is None


def test_tracing_without_the_packages_is_a_clear_start_up_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    settings = ServerSettings(otlp_traces_endpoint="http://collector:4318")
    with pytest.raises(TracingError, match=r"slhf\[otel\]"):
        create_app(settings, weights=WEIGHTS, engine_factory=lambda w, s: ScriptedEngine(str))


@pytest.mark.parametrize("endpoint", ["otel-collector:4318", "grpc://collector:4317", "/v1/traces"])
def test_an_endpoint_that_is_not_an_http_url_is_refused_at_start(endpoint: str) -> None:
    with pytest.raises(TracingError, match="not an http"):
        Tracing.from_settings(ServerSettings(otlp_traces_endpoint=endpoint))


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("https://otel.example/custom/traces", "https://otel.example/custom/traces"),
    ],
)
def test_an_endpoint_without_a_path_is_the_collectors_base(endpoint: str, url: str) -> None:
    assert traces_url(endpoint) == url


def test_the_engine_traces_to_our_endpoint_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME"):
        monkeypatch.setenv(name, "")  # restored (removed) after the test: engine_args sets it
        monkeypatch.delenv(name)
    assert tracing.engine_args(ServerSettings()) == {}
    ours = ServerSettings(otlp_traces_endpoint="http://collector:4318")
    assert tracing.engine_args(ours) == {"otlp_traces_endpoint": "http://collector:4318/v1/traces"}
    assert os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert os.environ["OTEL_SERVICE_NAME"] == "vllm"
    theirs = ServerSettings(
        otlp_traces_endpoint="http://collector:4318",
        engine_args={"otlp_traces_endpoint": "grpc://other:4317"},
    )
    assert tracing.engine_args(theirs) == {}


class SlowFollower(ScriptedEngine):
    """The Leader answers at once; a Follower round takes 5 s."""

    async def generate(
        self, role: str, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> Generation:
        if role == "follower":
            await asyncio.sleep(5)
        return await super().generate(role, prompt_token_ids, params, request_id)  # type: ignore[arg-type]


def test_a_round_cancelled_by_the_deadline_is_marked(exporter: InMemorySpanExporter) -> None:
    with _app(SlowFollower(numbered_script, context=512), exporter) as c:
        r = c.post("/v1/refine", json={"prompt": "x", "rounds": 1, "deadline_s": 0.3})
    assert r.status_code == 200 and r.json()["stopped_reason"] == "deadline", r.text
    (leader,) = by_name(exporter.get_finished_spans(), "slhf.leader")
    (follower,) = by_name(exporter.get_finished_spans(), "slhf.follower")
    assert follower.attributes["slhf.cancelled"] is True
    assert "slhf.cancelled" not in leader.attributes
    assert "gen_ai.usage.output_tokens" not in follower.attributes


class StuckExporter(InMemorySpanExporter):
    """A collector that never answers: each export takes 30 s."""

    def export(self, spans):  # type: ignore[no-untyped-def]
        time.sleep(30)
        return super().export(spans)


def test_a_collector_that_does_not_answer_never_holds_the_shutdown() -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(StuckExporter()))
    traced = Tracing(provider)
    traced.tracer.start_span("queued").end()
    started = time.monotonic()
    traced.shutdown(timeout_s=0.2)
    assert time.monotonic() - started < 2


def test_slhf_serve_refuses_an_unusable_endpoint_in_one_line() -> None:
    env = clean_env(SLHF_OTLP_TRACES_ENDPOINT="otel-collector:4318", SLHF_PORT="0")
    done = subprocess.run(
        serve_command(), env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "slhf serve: SLHF_OTLP_TRACES_ENDPOINT=otel-collector:4318 is not an http(s) URL; give "
        "the collector's OTLP/HTTP endpoint, e.g. http://otel-collector:4318"
    ]
