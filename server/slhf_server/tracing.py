"""OpenTelemetry traces of requests, their rounds and the upstream call (docs/observability.md).

Off by default. With ``SLHF_OTLP_TRACES_ENDPOINT`` set, ``Tracing.from_settings`` exports spans
over OTLP/HTTP (protobuf) from a batch processor, on the exporter's own thread, with
``service.name`` "slhf". The OpenTelemetry packages are the ``otel`` extra; they are imported
only when tracing is on.

The span tree of one request::

    POST /v1/chat/completions       server; joins the caller's trace (W3C traceparent/tracestate)
    ├── slhf.leader                 round 0 of each choice (or slhf.upstream: the upstream call)
    │   └── llm_request             vLLM's own span, when its engine traces too
    ├── slhf.follower               round 1
    │   └── llm_request
    └── ...

The request span is opened by ``RequestContextMiddleware`` and made current (``_ACTIVE``, and
OpenTelemetry's context), so everything below it -- the choices' tasks copy the context when
they are created -- finds it without being handed a tracer. ``round_span``, ``upstream_span``
and ``trace_headers`` cost one ``ContextVar`` lookup when tracing is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from slhf_server.preflight import StartupError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from slhf_server.engine import Generation, GenerationParams
    from slhf_server.refine import RefineOutcome
    from slhf_server.settings import ServerSettings

SERVICE_NAME = "slhf"
ENGINE_SERVICE_NAME = "vllm"
"""``service.name`` of vLLM's own spans, unless ``OTEL_SERVICE_NAME`` says otherwise."""
TRACES_PATH = "/v1/traces"
TRACE_HEADERS = ("traceparent", "tracestate")
SHUTDOWN_FLUSH_S = 2.0
"""How long the spans still queued at shutdown may take to leave."""
_PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"


class TracingError(StartupError):
    """Tracing is asked for, but cannot be: not an http(s) endpoint, or the OpenTelemetry
    packages are not installed."""


def check_tracing(settings: ServerSettings) -> None:
    """Raise ``TracingError`` when ``SLHF_OTLP_TRACES_ENDPOINT`` is set but cannot be used."""
    endpoint = settings.otlp_traces_endpoint
    if endpoint is None:
        return
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise TracingError(
            f"SLHF_OTLP_TRACES_ENDPOINT={endpoint} is not an http(s) URL; give the collector's "
            "OTLP/HTTP endpoint, e.g. http://otel-collector:4318"
        )
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as e:
        raise TracingError(
            f"SLHF_OTLP_TRACES_ENDPOINT={endpoint} asks for traces, but the OpenTelemetry "
            f"packages are not installed ({e}); install the 'otel' extra: "
            "pip install 'slhf[otel]'"
        ) from e


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``SLHF_OTLP_TRACES_ENDPOINT``: a URL without a path is the
    collector's base (``/v1/traces`` is added, as OTLP's ``OTEL_EXPORTER_OTLP_ENDPOINT``); one
    with a path is used as it is."""
    return endpoint.rstrip("/") + TRACES_PATH if urlsplit(endpoint).path in ("", "/") else endpoint


def engine_args(settings: ServerSettings) -> dict[str, Any]:
    """vLLM engine arguments that send vLLM's own request spans where ours go: the same
    endpoint, over OTLP/HTTP, as service "vllm". Nothing when tracing is off or when the engine
    arguments name their own ``otlp_traces_endpoint`` (``slhf serve --otlp-traces-endpoint``:
    that one, with vLLM's own protocol choice, wins)."""
    endpoint = settings.otlp_traces_endpoint
    if endpoint is None or "otlp_traces_endpoint" in settings.engine_args:
        return {}
    import os

    # vLLM reads its exporter's protocol (gRPC unless told otherwise) and its service name
    # from the environment; ours are set in code ("slhf" names our spans whatever this says)
    os.environ.setdefault(_PROTOCOL_ENV, "http/protobuf")
    os.environ.setdefault("OTEL_SERVICE_NAME", ENGINE_SERVICE_NAME)
    return {"otlp_traces_endpoint": traces_url(endpoint)}


@dataclass
class _Request:
    """The traced request in flight: what its spans hang from."""

    tracing: Tracing
    span: Span


_ACTIVE: ContextVar[_Request | None] = ContextVar("slhf_trace", default=None)
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


class Tracing:
    """The service's tracer, on a provider of its own (never the global one, which vLLM's
    engine sets for its spans)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("slhf_server")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Tracing | None:
        """The OTLP/HTTP exporting tracer ``SLHF_OTLP_TRACES_ENDPOINT`` asks for; None when
        unset. Raises ``TracingError`` when it cannot be (``check_tracing``)."""
        endpoint = settings.otlp_traces_endpoint
        if endpoint is None:
            return None
        check_tracing(settings)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME}),
            shutdown_on_exit=False,  # the app's lifespan flushes, within a bound
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(traces_url(endpoint))))
        return cls(provider)

    def start_request(
        self, method: str, path: str, headers: Mapping[str, str], rid: str
    ) -> RequestTrace:
        """Open the request's server span as a child of the caller's ``traceparent`` (if any)
        and make it current, until ``RequestTrace.end``."""
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        parent = self.propagator.extract(headers) if headers else None
        span = self.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path, "slhf.request_id": rid},
        )
        otel_token = otel_context.attach(trace.set_span_in_context(span, parent))
        return RequestTrace(span, otel_token, _ACTIVE.set(_Request(self, span)))

    def shutdown(self, timeout_s: float = SHUTDOWN_FLUSH_S) -> None:
        """Export what is still queued and stop the exporter, waiting ``timeout_s`` at most (a
        collector that does not answer never holds the server's exit). Blocks: call it off the
        event loop."""
        import threading

        done = threading.Thread(target=self.provider.shutdown, name="slhf-trace-flush", daemon=True)
        done.start()
        done.join(timeout_s)


@dataclass(frozen=True)
class RequestTrace:
    """A request span ``Tracing.start_request`` opened and made current."""

    span: Span
    otel_token: Token[Context]
    token: Token[_Request | None]

    def end(self, method: str, route: str, status: int) -> None:
        """Close the span with the request's route and HTTP status (in the request's context)."""
        from opentelemetry import context as otel_context
        from opentelemetry.trace import StatusCode

        _ACTIVE.reset(self.token)
        otel_context.detach(self.otel_token)
        self.span.update_name(f"{method} {route}")
        self.span.set_attributes({"http.route": route, "http.response.status_code": status})
        if status >= 500:
            self.span.set_status(StatusCode.ERROR)
        self.span.end()


def request_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The W3C trace context headers of an ASGI request."""
    wanted = {h.encode(): h for h in TRACE_HEADERS}
    return {wanted[k]: v.decode("latin-1") for k, v in raw if k in wanted}


# -- what the request's steps call (a ContextVar lookup when tracing is off) --------------------
def annotate_request(model: str, rounds: int, choices: int, response_id: str) -> None:
    """The plan's facts on the request span."""
    active = _ACTIVE.get()
    if active is not None:
        active.span.set_attributes(
            {
                "gen_ai.request.model": model,
                "gen_ai.response.id": response_id,
                "gen_ai.request.choice.count": choices,
                "slhf.rounds": rounds,
            }
        )


def observing(
    observe: Callable[[RefineOutcome], None],
) -> Callable[[RefineOutcome], None]:
    """``observe``, and each finished choice as an event of the request span."""
    active = _ACTIVE.get()
    if active is None:
        return observe
    span = active.span

    def observe_and_trace(outcome: RefineOutcome) -> None:
        observe(outcome)
        span.add_event(
            "slhf.choice.finished",
            {
                "slhf.stopped_reason": outcome.stopped_reason,
                "slhf.rounds_done": len(outcome.rounds),
                "gen_ai.usage.input_tokens": outcome.usage.prompt_tokens,
                "gen_ai.usage.output_tokens": outcome.usage.completion_tokens,
            },
        )

    return observe_and_trace


def round_span(
    role: str, round_index: int, request_id: str, prompt_tokens: int, params: GenerationParams
) -> contextlib.AbstractContextManager[Span | None]:
    """A round's span (current while it runs, so the engine's spans are its children); the
    span is None when tracing is off. ``record_generation`` adds what the round produced."""
    active = _ACTIVE.get()
    if active is None:
        return _NO_SPAN
    attributes = {
        "slhf.role": role,
        "slhf.round": round_index,
        "slhf.engine_request_id": request_id,
        "gen_ai.operation.name": "text_completion",
        "gen_ai.usage.input_tokens": prompt_tokens,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
    }
    if params.seed is not None:
        attributes["gen_ai.request.seed"] = params.seed
    return _current_span(active.tracing, f"slhf.{role}", attributes)


def record_generation(span: Span, gen: Generation) -> None:
    """A finished round's tokens and finish reason on its span."""
    span.set_attributes(
        {
            "gen_ai.usage.input_tokens": gen.prompt_tokens,
            "gen_ai.usage.output_tokens": gen.completion_tokens,
            "gen_ai.usage.cache_read.input_tokens": gen.cached_tokens or 0,
            "gen_ai.response.finish_reasons": [gen.finish_reason],
        }
    )
    if gen.drafts is not None:
        span.set_attributes(
            {"slhf.draft_tokens": gen.drafts.drafted, "slhf.accepted_tokens": gen.drafts.accepted}
        )


def upstream_span(base_url: str, model: str) -> contextlib.AbstractContextManager[Span | None]:
    """The client span of the upstream server's first answer (None when tracing is off)."""
    active = _ACTIVE.get()
    if active is None:
        return _NO_SPAN
    from opentelemetry.trace import SpanKind

    url = urlsplit(base_url)
    attributes = {
        "http.request.method": "POST",
        "server.address": url.hostname or "",
        "server.port": url.port or (443 if url.scheme == "https" else 80),
        "gen_ai.request.model": model,
        "slhf.round": 0,
        "slhf.role": "upstream",
    }
    return _current_span(active.tracing, "slhf.upstream", attributes, SpanKind.CLIENT)


def trace_headers() -> dict[str, str] | None:
    """The current span's W3C context (``traceparent``, ``tracestate``) for a downstream call;
    None when tracing is off."""
    active = _ACTIVE.get()
    if active is None:
        return None
    carrier: dict[str, str] = {}
    active.tracing.propagator.inject(carrier)
    return carrier


@contextlib.contextmanager
def _current_span(
    tracing: Tracing, name: str, attributes: dict[str, Any], kind: Any = None
) -> Iterator[Span]:
    """A span, current while the block runs; a block cancelled (deadline, client gone) marks
    its span ``slhf.cancelled`` (an exception is recorded as an error)."""
    from opentelemetry.trace import SpanKind

    with tracing.tracer.start_as_current_span(
        name, kind=kind or SpanKind.INTERNAL, attributes=attributes
    ) as span:
        try:
            yield span
        except BaseException as e:
            if not isinstance(e, Exception):
                span.set_attribute("slhf.cancelled", True)
            raise
