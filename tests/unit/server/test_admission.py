"""The admission bound is exported next to the in-flight gauge, so saturation (in-flight work
over the bound) is one PromQL division: what an autoscaler scales on (docs/deploy.md)."""

from __future__ import annotations

import multiprocessing

import pytest
from prometheus_client.parser import text_string_to_metric_families

from slhf_server.admission import Admission
from slhf_server.errors import OverloadedError
from slhf_server.metrics import ServiceMetrics


def scraped(metrics: ServiceMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("slhf_admission_")
    }


def test_the_bound_and_the_inflight_work_are_scraped_side_by_side() -> None:
    metrics = ServiceMetrics()
    admission = Admission(12, metrics)
    assert scraped(metrics)["slhf_admission_limit_generations"] == 12
    assert scraped(metrics)["slhf_admission_inflight_generations"] == 0
    ticket = admission.acquire(9)
    values = scraped(metrics)
    assert values["slhf_admission_inflight_generations"] / values[
        "slhf_admission_limit_generations"
    ] == pytest.approx(0.75)
    with pytest.raises(OverloadedError):
        admission.acquire(4)  # 9 + 4 > 12: refused, the bound unchanged
    assert scraped(metrics)["slhf_admission_limit_generations"] == 12
    ticket.release()
    assert scraped(metrics)["slhf_admission_inflight_generations"] == 0


def test_each_app_registry_carries_its_own_bound() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    Admission(64, a)
    Admission(256, b)
    assert scraped(a)["slhf_admission_limit_generations"] == 64
    assert scraped(b)["slhf_admission_limit_generations"] == 256


def test_api_processes_share_one_bound() -> None:
    """Two API processes' admissions (SLHF_API_SERVERS=2) on one shared counter: together they
    admit at most the bound; each reports the whole bound and its own in-flight work."""
    shared = multiprocessing.get_context("spawn").Value("q", 0)
    first, second = ServiceMetrics(), ServiceMetrics()
    a, b = Admission(12, first, shared), Admission(12, second, shared)
    ticket = a.acquire(9)
    with pytest.raises(OverloadedError, match="9 of 12 generations in flight"):
        b.acquire(4)  # 9 + 4 > 12, though the second process holds nothing
    other = b.acquire(3)
    assert shared.value == 12
    assert scraped(first)["slhf_admission_inflight_generations"] == 9
    assert scraped(second)["slhf_admission_inflight_generations"] == 3
    assert scraped(second)["slhf_admission_limit_generations"] == 12
    ticket.release()
    ticket.release()  # idempotent: gives back once
    assert shared.value == 3
    b.acquire(9).release()
    other.release()
    assert shared.value == 0 and a.weight == b.weight == 0
