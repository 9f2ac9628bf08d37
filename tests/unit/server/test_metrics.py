"""The event loop's lag probe (``ServiceMetrics.watch_loop_lag``): work that holds the loop
shows in ``slhf_event_loop_lag_seconds`` and its histogram."""

from __future__ import annotations

import asyncio
import math
import time

from slhf_server.metrics import ServiceMetrics


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
