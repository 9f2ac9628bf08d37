"""Property-based fuzz of the three request routes against a real server and real vLLM
(docs/reliability.md), with the hostile bodies of ``tests/hostile_requests.py``: every answer is a
200 or a 4xx envelope (or a deadline's 504), never another 5xx, and the server is healthy
afterwards.

Bounded: ``EXAMPLES`` cases (derandomized, so every run sends the same ones) and a ``BUDGET_S``
wall-clock budget after which the remaining cases are skipped; no shrinking (failures are
collected and reported together).
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from hypothesis import given

from tests.hostile_requests import REQUESTS, encode, fuzz_settings, violation
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration

EXAMPLES = 1000
BUDGET_S = 90.0


def test_fuzzed_requests_get_200_or_4xx_envelopes_and_the_server_stays_healthy(
    hostile_server: ServerProcess,
) -> None:
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    client = httpx.Client(base_url=hostile_server.url, timeout=60)

    @given(request=REQUESTS)
    @fuzz_settings(EXAMPLES)
    def run(request: tuple[str, object]) -> None:
        if time.monotonic() - started > BUDGET_S:
            return
        path, body = request
        content = encode(body)
        r = client.post(path, content=content, headers={"Content-Type": "application/json"})
        statuses[r.status_code] += 1
        problem = violation(r)
        if problem:
            failures.append(f"POST {path} {content[:300]!r} -> {problem}")

    try:
        run()
        elapsed = time.monotonic() - started
        health = client.get("/health")
        ready = client.get("/ready")
        normal = client.post("/v1/refine", json={"prompt": "Hello", "rounds": 1})
    finally:
        client.close()
    total = sum(statuses.values())
    print(f"fuzz: {total} requests in {elapsed:.1f} s, statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert total >= 100, f"only {total} requests within the {BUDGET_S:g} s budget"
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if s >= 400) > 0
    assert health.status_code == ready.status_code == normal.status_code == 200
