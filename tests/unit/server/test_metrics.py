"""The event loop's lag probe (``ServiceMetrics.watch_loop_lag``): work that holds the loop
shows in ``slhf_event_loop_lag_seconds`` and its histogram. With several API processes, each
metric is combined over them as documented (docs/observability.md)."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import Gauge, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from slhf_server.metrics import GAUGE_MODES, ServiceMetrics


def test_work_that_holds_the_loop_shows_as_lag() -> None:
    metrics = ServiceMetrics()

    async def main() -> None:
        probe = asyncio.create_task(metrics.watch_loop_lag(0.05))
        await asyncio.sleep(0.2)
        assert metrics.registry.get_sample_value("slhf_event_loop_lag_seconds") is not None
        time.sleep(0.3)  # CPU work on the loop (a busy machine only adds lag)
        await asyncio.sleep(0.12)
        probe.cancel()

    asyncio.run(main())
    sample = metrics.registry.get_sample_value
    assert (sample("slhf_event_loop_lag_seconds") or 0) >= 0.2
    assert (sample("slhf_event_loop_lag_sample_seconds_count") or 0) >= 4
    assert (sample("slhf_event_loop_lag_sample_seconds_bucket", {"le": "10.0"}) or 0) >= 4


def test_an_engine_that_cannot_count_its_requests_does_not_break_metrics() -> None:
    metrics = ServiceMetrics()

    def broken() -> int:
        raise RuntimeError("engine is dead")

    metrics.watch_engine(broken)
    assert math.isnan(metrics.registry.get_sample_value("slhf_engine_running_requests") or 0.0)
    assert b"slhf_engine_running_requests NaN" in metrics.render()


def test_labelled_children_are_looked_up_once_and_count_where_prometheus_reads() -> None:
    metrics = ServiceMetrics()
    a = metrics.child(metrics.tokens, "leader", "prompt")
    assert metrics.child(metrics.tokens, "leader", "prompt") is a
    assert metrics.child(metrics.tokens, "leader", "completion") is not a
    assert metrics.child(metrics.stops, "leader") is not metrics.child(metrics.rejections, "leader")
    a.inc(3)
    metrics.child(metrics.tokens, "leader", "prompt").inc(2)
    labels = {"role": "leader", "kind": "prompt"}
    assert metrics.registry.get_sample_value("slhf_tokens_total", labels) == 5


# -- several API processes (SLHF_API_SERVERS): how /metrics combines them -----------------------
def test_every_gauge_says_how_api_processes_combine_it() -> None:
    metrics = ServiceMetrics()
    gauges = {g._name: g for g in vars(metrics).values() if isinstance(g, Gauge)}
    assert set(gauges) == set(GAUGE_MODES)
    for name, gauge in gauges.items():
        assert gauge._multiprocess_mode == GAUGE_MODES[name], name
    # what each process holds a share of adds up; the shared bound and the flags do not
    assert GAUGE_MODES["slhf_admission_inflight_generations"] == "livesum"
    assert GAUGE_MODES["slhf_engine_running_requests"] == "livesum"
    assert GAUGE_MODES["slhf_admission_limit_generations"] == "livemax"
    assert GAUGE_MODES["slhf_draining"] == "livemax"


# One API process: records its share, then scrapes what every process wrote (a fresh interpreter,
# as prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is imported).
API_PROCESS = r"""
import os, sys
from slhf_server.metrics import ServiceMetrics
requests, inflight, lag = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
m = ServiceMetrics(multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"])
m.requests.labels("/v1/refine", "200").inc(requests)
m.admission_limit.set(64)
m.admitted_weight.set(inflight)
m.loop_lag.set(lag)
m.watch_engine(lambda: inflight + 1)
m.tokens.labels("leader", "prompt").inc(10 * requests)
sys.stdout.write(f"{os.getpid()}\n" + m.render().decode())
"""


def api_process(
    metrics_dir: Path, requests: int, inflight: int, lag: float
) -> tuple[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """Run one API process; its pid and the samples of the ``/metrics`` it answers."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    args = [sys.executable, "-c", API_PROCESS, str(requests), str(inflight), str(lag)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=True)
    pid, text = done.stdout.split("\n", 1)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return int(pid), samples


def test_metrics_of_several_api_processes_are_combined_whichever_answers(tmp_path: Path) -> None:
    first_pid, _ = api_process(tmp_path, requests=3, inflight=5, lag=0.25)
    _, seen = api_process(tmp_path, requests=4, inflight=2, lag=0.5)
    refine = (("route", "/v1/refine"), ("status", "200"))
    assert seen[("slhf_requests_total", refine)] == 3 + 4  # counters: summed
    assert seen[("slhf_tokens_total", (("kind", "prompt"), ("role", "leader")))] == 70
    assert seen[("slhf_admission_inflight_generations", ())] == 5 + 2  # livesum
    assert seen[("slhf_engine_running_requests", ())] == 6 + 3  # livesum, set without a callback
    assert seen[("slhf_admission_limit_generations", ())] == 64  # livemax: the shared bound
    assert seen[("slhf_event_loop_lag_seconds", ())] == 0.5  # livemax: the worst process

    # a process marked dead (the supervisor does it when one exits) leaves the live gauges;
    # its counts stay in the counters
    multiprocess.mark_process_dead(first_pid, str(tmp_path))
    _, after = api_process(tmp_path, requests=0, inflight=0, lag=0.0)
    assert after[("slhf_requests_total", refine)] == 7
    assert after[("slhf_admission_inflight_generations", ())] == 2
