"""Traces end to end: the real ``slhf serve`` on the shipped demo model (a real vLLM CPU engine)
sends its spans over OTLP/HTTP to a receiver on loopback, which decodes each
``ExportTraceServiceRequest`` with opentelemetry-proto (docs/observability.md)."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.integration.conftest import ServerProcess, server_env

pytestmark = pytest.mark.integration

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, which) if which else None


class OtlpReceiver:
    """An OTLP/HTTP traces receiver on loopback: POST /v1/traces, protobuf bodies."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    span = ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        kind=s.kind,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                    )
                    with self.lock:
                        self.spans.append(span)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced_server(
    tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver
) -> Iterator[ServerProcess]:
    """The shipped demo model, traces to ``receiver`` (batches exported every 200 ms)."""
    log = tmp_path_factory.mktemp("logs") / "traced.log"
    env = server_env(
        SLHF_OTLP_TRACES_ENDPOINT=receiver.url,
        SLHF_MAX_MODEL_LEN="512",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    with ServerProcess.start(log, env=env) as server:
        yield server


def wait_for(receiver: OtlpReceiver, trace_id: str, wanted: dict[str, int]) -> list[ReceivedSpan]:
    """The trace's spans once ``wanted`` (name -> count) have arrived (30 s at most)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = receiver.trace(trace_id)
        names = [s.name for s in spans]
        if all(names.count(name) >= n for name, n in wanted.items()):
            return spans
        time.sleep(0.1)
    raise AssertionError(f"spans {wanted} did not all arrive: {receiver.trace(trace_id)}")


def test_a_two_round_request_arrives_as_one_trace_under_the_callers(
    traced_server: ServerProcess, receiver: OtlpReceiver
) -> None:
    r = httpx.post(
        traced_server.url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Which option wins?"}],
            "max_tokens": 8,
            "temperature": 0,
            "refinement": {"rounds": 2, "stop_when_unchanged": False, "return_trace": True},
        },
        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    wanted = {"POST /v1/chat/completions": 1, "slhf.leader": 1, "slhf.follower": 2}
    spans = wait_for(receiver, CALLER_TRACE, {**wanted, "llm_request": 3})
    ours = [s for s in spans if s.service == "slhf"]
    (request,) = [s for s in ours if s.name == "POST /v1/chat/completions"]
    assert request.parent_span_id == CALLER_SPAN
    assert request.kind == 2  # SPAN_KIND_SERVER
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["slhf.request_id"] == r.headers["x-request-id"]
    assert request.attributes["gen_ai.request.model"] == body["model"]
    assert request.attributes["gen_ai.response.id"] == body["id"]
    assert request.attributes["slhf.rounds"] == 2
    rounds = sorted(
        (s for s in ours if s.name in ("slhf.leader", "slhf.follower")),
        key=lambda s: s.attributes["slhf.round"],
    )
    assert [(s.name, s.attributes["slhf.round"]) for s in rounds] == [
        ("slhf.leader", 0),
        ("slhf.follower", 1),
        ("slhf.follower", 2),
    ]
    trace = body["choices"][0]["refinement"]
    steps = [trace["leader"], *trace["rounds"]]
    for span, step in zip(rounds, steps, strict=True):
        assert span.parent_span_id == request.span_id
        assert span.attributes["slhf.role"] == span.name.removeprefix("slhf.")
        assert span.attributes["gen_ai.usage.input_tokens"] == step["usage"]["prompt_tokens"]
        assert span.attributes["gen_ai.usage.output_tokens"] == step["usage"]["completion_tokens"]
        assert span.attributes["gen_ai.response.finish_reasons"] == (step["finish_reason"],)
        assert span.attributes["gen_ai.usage.cache_read.input_tokens"] >= 0
        engine_request_id = f"{body['id']}-0-{span.attributes['slhf.round']}"
        assert span.attributes["slhf.engine_request_id"] == engine_request_id
        # vLLM's own span of the round's engine request is the round span's child
        (engine,) = [s for s in spans if s.parent_span_id == span.span_id]
        assert (engine.name, engine.service) == ("llm_request", "vllm")
        assert engine.attributes["gen_ai.request.id"] == engine_request_id
        assert (
            engine.attributes["gen_ai.usage.completion_tokens"]
            == step["usage"]["completion_tokens"]
        )
