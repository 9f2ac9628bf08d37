"""Prometheus metrics of the service (one fresh registry per app) and the ``/metrics`` text.

``/metrics`` serves this registry followed by prometheus_client's default registry, where vLLM's
own ``vllm:*`` engine metrics live (``slhf_server.vllm_engine`` turns vLLM's Prometheus stat logger
on).
Labels stay low-cardinality: route templates, status codes, roles, round numbers capped at
``ROUND_LABELS``, and fixed reason words.

With several API processes (``SLHF_API_SERVERS`` > 1) every process writes its metrics to files
in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, set before any process
imports it) and ``/metrics`` reads them all, whichever process answers: counters and histograms
are summed over the processes; each gauge says how (``multiprocess_mode``, ignored with one
process): "livesum" for what each process holds a share of (its admitted work and requests, its
engine client's unfinished requests), "livemax" where a sum means nothing (the admission
bound, which the processes share and each reports whole; the drain flag; the event-loop lag:
the worst process's). "live" modes leave out processes that have exited (``mark_process_dead``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from slhf_server.protocol import Usage
from slhf_server.refine import RefineOutcome

ROUND_LABELS = 8
"""Rounds above this share the label ``"9+"`` (``round`` stays a bounded label)."""

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOOP_LAG_INTERVAL_S = 0.1
"""How often the event loop's lag is sampled (``ServiceMetrics.watch_loop_lag``)."""
_ROUND_BUCKETS = (*(float(i) for i in range(ROUND_LABELS + 1)), 16.0, 32.0, 64.0)


M = TypeVar("M", Counter, Gauge, Histogram)


def round_label(index: int) -> str:
    return str(index) if index <= ROUND_LABELS else f"{ROUND_LABELS + 1}+"


GaugeMode = Literal["livesum", "livemax"]
GAUGE_MODES: dict[str, GaugeMode] = {
    "slhf_admission_inflight_generations": "livesum",
    "slhf_admission_limit_generations": "livemax",
    "slhf_admission_inflight_requests": "livesum",
    "slhf_engine_running_requests": "livesum",
    "slhf_draining": "livemax",
    "slhf_event_loop_lag_seconds": "livemax",
}
"""How ``/metrics`` combines each gauge over the API processes (module docstring)."""


class ServiceMetrics:
    """Every metric the service records, in its own registry.

    ``multiprocess_dir``: this is one of several API processes, whose metrics live in that
    directory (``PROMETHEUS_MULTIPROC_DIR``); ``render`` then reads every process's."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.multiprocess_dir = multiprocess_dir
        self._engine_running: Callable[[], float] | None = None
        self.requests = Counter(
            "slhf_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "slhf_request_latency_seconds",
            "Time to the end of the response, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rounds = Histogram(
            "slhf_rounds_per_request",
            "Follower rounds completed per refinement",
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.generation_latency = Histogram(
            "slhf_generation_latency_seconds",
            "Latency of one generation, by role and round (0 = first answer)",
            ["role", "round"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "slhf_tokens", "Tokens by role and kind", ["role", "kind"], registry=r
        )
        self.round_prompt_tokens = Counter(
            "slhf_round_prompt_tokens",
            "Prompt tokens by role and round, and how many the prefix cache served (cached=yes)",
            ["role", "round", "cached"],
            registry=r,
        )
        self.draft_tokens = Counter(
            "slhf_draft_tokens",
            "Speculative draft tokens (SLHF_SPECULATIVE) by role, round and outcome",
            ["role", "round", "outcome"],
            registry=r,
        )
        self.stops = Counter("slhf_stops", "Refinements by stopped_reason", ["reason"], registry=r)
        self.admitted_weight = self._gauge(
            "slhf_admission_inflight_generations",
            "Admitted in-flight work, in generations (n x (rounds + 1))",
        )
        self.admission_limit = self._gauge(
            "slhf_admission_limit_generations",
            "Admission bound (SLHF_MAX_INFLIGHT_GENERATIONS): saturation is inflight / limit",
        )
        self.admitted_requests = self._gauge(
            "slhf_admission_inflight_requests",
            "Admitted in-flight requests",
        )
        self.rejections = Counter(
            "slhf_admission_rejections", "Requests refused by reason", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "slhf_upstream_errors", "Failed upstream first answers by code", ["code"], registry=r
        )
        self.engine_running = self._gauge(
            "slhf_engine_running_requests",
            "Requests the engine has not finished (all roles)",
        )
        self.draining = self._gauge(
            "slhf_draining",
            "1 while the server drains for shutdown",
        )
        self.loop_lag = self._gauge(
            "slhf_event_loop_lag_seconds",
            "How late the event loop ran its last lag probe (a timer due every "
            f"{LOOP_LAG_INTERVAL_S:g} s); the largest lag of the last second",
        )
        self.loop_lag_samples = Histogram(
            "slhf_event_loop_lag_sample_seconds",
            f"Event loop lag, one sample every {LOOP_LAG_INTERVAL_S:g} s",
            buckets=_LAG_BUCKETS,
            registry=r,
        )

    async def watch_loop_lag(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Sample the running event loop's lag forever (a task of the app's lifespan): how much
        later than due a timer of ``interval_s`` fires. Work that holds the loop shows here."""
        loop = asyncio.get_running_loop()
        window = max(1, round(1.0 / interval_s))
        recent: list[float] = []
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            lag = max(0.0, loop.time() - due)
            recent = [*recent[-(window - 1) :], lag]
            self.loop_lag.set(max(recent))
            self.loop_lag_samples.observe(lag)
            if self._engine_running is not None:  # several processes: no callbacks at scrape
                self.engine_running.set(self._engine_running())

    def _gauge(self, name: str, documentation: str) -> Gauge:
        """A gauge of this registry, combined over API processes as ``GAUGE_MODES`` says."""
        return Gauge(
            name, documentation, multiprocess_mode=GAUGE_MODES[name], registry=self.registry
        )

    def watch_engine(self, num_running: Callable[[], int]) -> None:
        def running() -> float:
            try:
                return float(num_running())
            except Exception:  # a dead engine may not say: /metrics still answers
                return math.nan

        if self.multiprocess_dir is None:
            self.engine_running.set_function(running)
        else:  # a scrape reads the files: the lag probe writes the value every tick
            self._engine_running = running
            self.engine_running.set(running())

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, looked up once: prometheus_client validates and joins the
        labels on every call (about ten calls per finished request). Labels are low-cardinality
        (module docstring), so the cache stays small."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_outcome(self, outcome: RefineOutcome) -> None:
        """Rounds, stop reason, per-round latency and tokens of one finished refinement."""
        self.rounds.observe(len(outcome.rounds))
        self.child(self.stops, outcome.stopped_reason).inc()
        leader = outcome.leader
        first_role = "leader" if leader.source == "leader" else leader.source
        if leader.source != "given":
            self.child(self.generation_latency, first_role, "0").observe(leader.latency_ms / 1000)
        self._tokens(first_role, leader.usage.prompt_tokens, leader.usage.completion_tokens)
        self._round_usage(first_role, "0", leader.usage)
        for r in outcome.rounds:
            label = round_label(r.round)
            self.child(self.generation_latency, "follower", label).observe(r.latency_ms / 1000)
            self._tokens("follower", r.usage.prompt_tokens, r.usage.completion_tokens)
            self._round_usage("follower", label, r.usage)

    def _round_usage(self, role: str, label: str, usage: Usage) -> None:
        """Prompt tokens split by prefix-cache hit, and draft outcomes, where reported."""
        details = usage.prompt_tokens_details
        if details is not None and usage.prompt_tokens:
            cached = details.cached_tokens
            self.child(self.round_prompt_tokens, role, label, "yes").inc(cached)
            self.child(self.round_prompt_tokens, role, label, "no").inc(
                usage.prompt_tokens - cached
            )
        drafts = usage.completion_tokens_details
        if drafts is not None:
            self.child(self.draft_tokens, role, label, "accepted").inc(
                drafts.accepted_prediction_tokens
            )
            self.child(self.draft_tokens, role, label, "rejected").inc(
                drafts.rejected_prediction_tokens
            )

    def _tokens(self, role: str, prompt: int, completion: int) -> None:
        if prompt:
            self.child(self.tokens, role, "prompt").inc(prompt)
        if completion:
            self.child(self.tokens, role, "completion").inc(completion)

    def render(self) -> bytes:
        """This service's metrics, then the process-wide registry (vLLM's ``vllm:*``); with
        several API processes, every process's metrics (both kinds), combined."""
        if self.multiprocess_dir is not None:
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined, self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(combined)
        return generate_latest(self.registry) + generate_latest(REGISTRY)
