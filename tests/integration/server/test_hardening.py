"""Hardening end-to-end: a real server process with auth, a small admission bound and short
deadlines (one per session), plus a short-lived one for the SIGTERM drain. Loopback only; every
loop is bounded by a count and a time limit."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration

KEY = "sk-integration-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BOUND = 16
# every generation runs to max_tokens whatever this CPU samples (a random model may still emit EOS)
LONG = {"temperature": 1.0, "max_tokens": 400, "seed": 7, "ignore_eos": True}
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="session")
def hardened_server(
    tmp_path_factory: pytest.TempPathFactory, random_model: Path
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "hardened.log"
    server = ServerProcess.start(
        log,
        SLHF_MODEL=str(random_model),
        SLHF_MAX_ROUNDS="4",
        # room for every round's full 400 tokens: long requests stay long (disconnect, deadline)
        SLHF_MAX_MODEL_LEN="2048",
        SLHF_API_KEYS=KEY,
        SLHF_MAX_INFLIGHT_GENERATIONS=str(BOUND),
        SLHF_MAX_DEADLINE_S="30",
        SLHF_MAX_TOKENS_CAP="500",
    )
    try:
        yield server
    finally:
        server.stop()


def running(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(r"^slhf_engine_running_requests (\S+)$", text, re.M)
    assert match, "slhf_engine_running_requests missing from /metrics"
    return float(match.group(1))


def admitted(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(r"^slhf_admission_inflight_requests (\S+)$", text, re.M)
    assert match, "slhf_admission_inflight_requests missing from /metrics"
    return float(match.group(1))


def idle_within(server: ServerProcess, seconds: float = 1.0) -> bool:
    """Whether the engine runs nothing within ``seconds`` (an abort takes a moment to land)."""
    t0 = time.monotonic()
    while running(server) > 0:
        if time.monotonic() - t0 > seconds:
            return False
        time.sleep(0.02)
    return True


def test_auth_guards_every_route_but_health_ready_metrics(hardened_server: ServerProcess) -> None:
    url = hardened_server.url
    calls = [
        ("POST", "/v1/refine", {"prompt": "hi", "rounds": 1}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/completions", {"prompt": "hi"}),
        ("GET", "/v1/models", None),
    ]
    for method, path, body in calls:
        r = httpx.request(method, url + path, json=body, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["x-request-id"]
        r = httpx.request(method, url + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, (path, r.text)
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + path, timeout=10).status_code == 200
    assert KEY not in hardened_server.log.read_text()


def test_metrics_include_vllm_engine_metrics(hardened_server: ServerProcess) -> None:
    text = httpx.get(hardened_server.url + "/metrics", timeout=10).text
    assert "vllm:num_requests_running" in text and "slhf_requests_total" in text


async def _load(url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=180, headers=AUTH) as client:
        body = {"prompt": "Tell me about the sea", "rounds": 1, "leader": {"max_tokens": 8}}
        body["follower"] = {"max_tokens": 8}
        return list(
            await asyncio.gather(
                *(client.post(url + "/v1/refine", json=body) for _ in range(count))
            )
        )


def test_load_burst_gets_200_or_429_and_never_5xx(hardened_server: ServerProcess) -> None:
    count = 300
    t0 = time.monotonic()
    responses = asyncio.run(_load(hardened_server.url, count))
    codes = Counter(r.status_code for r in responses)
    FIGURES["load"] = {"requests": count, **codes, "seconds": round(time.monotonic() - t0, 1)}
    print("load test:", FIGURES["load"])
    assert set(codes) <= {200, 429} and codes[200] >= BOUND // 2, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
    assert httpx.get(hardened_server.url + "/ready", timeout=10).status_code == 200
    assert idle_within(hardened_server)


async def _catch_in_flight(url: str, path: str, body: dict, server: ServerProcess) -> float | None:
    """Start a long request, wait until the engine runs it, drop the connection; seconds until
    the engine runs nothing, or None when the request ended before it was seen running."""
    client = httpx.AsyncClient(timeout=120, headers=AUTH)
    task = asyncio.ensure_future(client.post(url + path, json=body))
    for _ in range(400):
        await asyncio.sleep(0.025)
        if await asyncio.to_thread(running, server) > 0:
            break
        if task.done():
            task.result().raise_for_status()
            await client.aclose()
            return None
    else:
        pytest.fail("the request never reached the engine")
    task.cancel()
    await client.aclose()  # closes the socket: the server sees the disconnect
    t0 = time.monotonic()
    while await asyncio.to_thread(running, server) > 0 and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def _disconnect(url: str, path: str, body: dict, server: ServerProcess) -> float:
    """``_catch_in_flight``, tried up to three times. The in-process engine keeps this server's
    event loop busy: a /metrics scrape can take 1.5 s while the whole request takes about 3 s, so
    on a loaded machine the request may end between two scrapes. That attempt tests nothing (there
    was nothing to abort) and is tried again; three such misses fail the test."""
    for _ in range(3):
        elapsed = await _catch_in_flight(url, path, body, server)
        if elapsed is not None:
            return elapsed
        await asyncio.sleep(0.5)
    pytest.fail("three requests in a row ended before the engine was seen running them")


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_engine_requests_within_a_second(
    hardened_server: ServerProcess, stream: bool
) -> None:
    if stream:
        path = "/v1/chat/completions"
        body: dict = {"messages": [{"role": "user", "content": "Write a poem"}], "stream": True}
        body.update(LONG, refinement={"rounds": 4, "stop_when_unchanged": False})
    else:
        path, body = "/v1/refine", {"prompt": "Write a poem", "rounds": 4, "leader": LONG}
        body.update(follower=LONG, stop_when_unchanged=False)
    elapsed = asyncio.run(_disconnect(hardened_server.url, path, body, hardened_server))
    FIGURES[f"cancel_stream={stream}"] = round(elapsed, 3)
    print(f"disconnect (stream={stream}): running requests at 0 after {elapsed:.3f} s")
    assert elapsed < 1.0
    # and no round started afterwards
    time.sleep(0.5)
    assert running(hardened_server) == 0


def test_deadline_returns_best_so_far(hardened_server: ServerProcess) -> None:
    # A deadline test depends on how fast this (shared, loaded) machine is: start tight and widen
    # the deadline only while the Leader itself could not finish in time (504). Four 400-token
    # Follower rounds take far longer than any deadline tried, so the chain must be cut short.
    body = {
        "prompt": "Explain tides",
        "rounds": 4,
        "leader": {"max_tokens": 4},
        "follower": LONG,
        "stop_when_unchanged": False,
    }
    for deadline in (0.5, 1.0, 2.0, 4.0):
        t0 = time.monotonic()
        r = httpx.post(
            hardened_server.url + "/v1/refine",
            json={**body, "deadline_s": deadline},
            headers=AUTH,
            timeout=60,
        )
        elapsed = time.monotonic() - t0
        if r.status_code != 504:
            break
        assert r.json()["error"]["code"] == "deadline_exceeded"
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["stopped_reason"] == "deadline" and len(out["rounds"]) < 4
    assert out["final"] == (out["rounds"][-1]["text"] if out["rounds"] else out["leader"]["text"])
    assert elapsed < deadline + 1.5
    FIGURES["deadline_s"] = deadline
    assert idle_within(hardened_server)
    tiny = {**body, "leader": LONG, "deadline_s": 0.001}
    r = httpx.post(hardened_server.url + "/v1/refine", json=tiny, headers=AUTH, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


def test_sigterm_drains_then_exits_zero(
    tmp_path_factory: pytest.TempPathFactory, random_model: Path
) -> None:
    log = tmp_path_factory.mktemp("logs") / "drain.log"
    server = ServerProcess.start(
        log,
        SLHF_MODEL=str(random_model),
        SLHF_MAX_ROUNDS="4",
        SLHF_MAX_MODEL_LEN="2048",
        SLHF_DRAIN_GRACE_S="120",
    )
    try:
        outcome = asyncio.run(_drain_scenario(server))
        code = server.proc.wait(timeout=60)
    finally:
        server.stop()
    FIGURES["drain"] = {**outcome, "exit": code}
    print("drain:", FIGURES["drain"])
    assert outcome["in_flight"] == 200 and outcome["new"] == 503 and outcome["ready"] == 503
    assert code == 0


async def _drain_scenario(server: ServerProcess) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=60) as client:
        # Five 400-token generations (a context of 2,048 leaves every round its full length):
        # seconds of work, so the request is still running well after SIGTERM arrives, even
        # when it is noticed late on a loaded machine.
        body = {
            "prompt": "Write a story",
            "rounds": 4,
            "leader": LONG,
            "follower": LONG,
            "stop_when_unchanged": False,
        }
        # Admission is counted before any engine work and held until the answer is sent (between
        # rounds too), so it is the signal that the request is in flight. Should a fast machine
        # finish the request before the poll sees it, start another (at most three tries).
        for _ in range(3):
            in_flight = asyncio.ensure_future(client.post(server.url + "/v1/refine", json=body))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if in_flight.done() or await asyncio.to_thread(admitted, server) > 0:
                    break
            if not in_flight.done():
                break
            await in_flight
        assert not in_flight.done(), "three requests each finished before SIGTERM could be sent"
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        new = await client.post(server.url + "/v1/refine", json={"prompt": "x"})
        ready = await client.get(server.url + "/ready")
        done = await in_flight
    return {"in_flight": done.status_code, "new": new.status_code, "ready": ready.status_code}
