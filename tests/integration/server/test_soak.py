"""A load-and-fault soak against a real server (the shipped demo model, a real vLLM CPU engine in
its own process, loopback only; docs/reliability.md, "Soak").

Mixed traffic at a concurrency that saturates admission (refine, chat, streams read to the end
and streams dropped after their first event, upstream first answers from the fake upstream of
tests/integration/fake_upstream.py, prompts too big to fit, requests past their deadline), with
faults: the upstream hanging (``drip``: one byte a second, past ``SLHF_UPSTREAM_TIMEOUT_S``), a
client that never reads its stream, a client that sends its headers too slowly, and at the end
the engine process killed. Asserted:

- while the engine lives: ``/health`` p99 <= 0.5 s and never a timeout; every answer a 2xx, a 4xx,
  or the documented 504 of the request's own deadline or the hanging upstream -- no other 5xx;
- RSS of the server process grows <= 5 % from the end of the warm-up to the end of the traffic;
- nothing in flight afterwards (``slhf_admission_inflight_*`` and the engine's running requests);
- once the engine process is killed: ``/health`` and requests get the documented 503s, fast;
- on SIGTERM the process exits 0 within ``SLHF_DRAIN_GRACE_S`` + 2 s + ``SLHF_SHUTDOWN_TIMEOUT_S``.

The traffic lasts ``SLHF_SOAK_S`` seconds (default 20: the short soak of the normal test run);
``make soak`` runs it for 300 s. The figures are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import ServerProcess, server_env
from tests.integration.fake_upstream import FakeUpstream

SOAK_S = float(os.environ.get("SLHF_SOAK_S", "20"))
WARMUP_S = min(10.0, SOAK_S / 3)
CONCURRENCY = 12
ADMISSION = 8  # generations: 12 clients of weight 1-3 saturate it
HEADER_TIMEOUT_S = 2.0
UPSTREAM_TIMEOUT_S = 2.0
DRAIN_GRACE_S = 5.0
SHUTDOWN_TIMEOUT_S = 5.0
EXIT_BOUND_S = DRAIN_GRACE_S + 2.0 + SHUTDOWN_TIMEOUT_S
HEALTH_P99_S = 0.5
HEALTH_TIMEOUT_S = 2.0
RSS_GROWTH = 0.05
BIG = 2 * 1024 * 1024
BIG_BODY = json.dumps({"prompt": "word " * (BIG // 5)}).encode()
JSON = {"Content-Type": "application/json"}

# the documented 5xx a live server may answer: the request's own deadline, the hanging upstream
LIVE_5XX = {(504, "deadline_exceeded"), (504, "upstream_timeout")}
DEAD_CODES = {"engine_dead", "engine_error"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "soak.log"
    env = server_env(
        SLHF_MAX_INFLIGHT_GENERATIONS=str(ADMISSION),
        SLHF_MAX_ROUNDS="2",
        SLHF_MAX_TOKENS_CAP="24",
        SLHF_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        SLHF_UPSTREAM_BASE_URL=upstream.base_url,
        SLHF_UPSTREAM_MODEL="fake",
        SLHF_UPSTREAM_TIMEOUT_S=str(UPSTREAM_TIMEOUT_S),
        SLHF_DRAIN_GRACE_S=str(DRAIN_GRACE_S),
        SLHF_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S),
    )
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the engine in its own process, to be killed
    with ServerProcess.start(log, env=env) as proc:
        yield proc


# -- the traffic --------------------------------------------------------------------------------
class Tally:
    def __init__(self) -> None:
        self.answers: Counter[tuple[int, str]] = Counter()
        self.kinds: Counter[str] = Counter()
        self.bad: list[str] = []

    def record(self, kind: str, status: int, code: str, dead: bool, detail: str = "") -> None:
        self.kinds[kind] += 1
        self.answers[(status, code)] += 1
        ok = status < 500 or (status, code) in LIVE_5XX or (dead and code in DEAD_CODES)
        if not ok:
            self.bad.append(f"{kind}: {status} {code} {detail[:200]}")


def _code(r: httpx.Response) -> str:
    if r.status_code == 200:
        return ""
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "no-envelope"


async def _one(
    client: httpx.AsyncClient, model: str, rng: random.Random, tally: Tally, dead: bool
) -> None:
    kind = rng.choice(
        ["refine", "chat", "stream", "drop", "upstream", "hang", "big", "deadline", "leader"]
    )
    question = f"Is {rng.randint(1, 99)} + {rng.randint(1, 99)} even?"
    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 16}
    if kind == "refine":
        r = await client.post("/v1/refine", json={"prompt": question, "rounds": rng.randint(0, 2)})
    elif kind == "leader":
        r = await client.post("/v1/chat/completions", json={**chat, "model": model + ":leader"})
    elif kind == "chat":
        r = await client.post("/v1/chat/completions", json={**chat, "refinement": {"rounds": 1}})
    elif kind in ("stream", "drop"):
        body = {**chat, "stream": True, "refinement": {"rounds": 1, "stream_rounds": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 200:
                async for line in r.aiter_lines():
                    if kind == "drop" and line.startswith("data: "):
                        break  # the client goes away mid-stream
                    if '"error"' in line and not dead:
                        tally.bad.append(f"stream error event while alive: {line[:200]}")
            else:
                await r.aread()
    elif kind in ("upstream", "hang"):
        content = question + (" drip" if kind == "hang" else "")
        body = {
            **chat,
            "model": model + "@upstream",
            "messages": [{"role": "user", "content": content}],
        }
        r = await client.post("/v1/chat/completions", json=body)
    elif kind == "big":
        r = await client.post("/v1/refine", content=BIG_BODY, headers=JSON)
        if not dead:
            assert r.status_code == 400 and _code(r) == "context_length_exceeded", r.text[:300]
    else:  # a deadline shorter than the work
        body = {**chat, "refinement": {"rounds": 2, "deadline_s": rng.choice([0.01, 0.2, 1.0])}}
        r = await client.post("/v1/chat/completions", json=body)
    tally.record(kind, r.status_code, _code(r), dead, r.text if r.status_code >= 500 else "")


async def traffic(url: str, model: str, until: float, tally: Tally, dead: bool, seed: int) -> None:
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=limits, trust_env=False
    ) as client:

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < until:
                await _one(client, model, rng, tally, dead)

        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))


# -- the probes and the faults ------------------------------------------------------------------
PROBE = """
import http.client, os, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "w", buffering=1)
while True:
    start = time.monotonic()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=float(sys.argv[4]))
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
    except OSError:
        status = 0
    out.write(f"{start} {time.monotonic() - start} {status} {os.getloadavg()[0]}\\n")
    time.sleep(0.05)
"""


class HealthProbe:
    """``/health`` every 50 ms from a process of its own (the traffic in this one, and its GIL,
    do not delay the probe): when, how long, status (0 = timeout or refused)."""

    def __init__(self, url: str, out: Path) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROBE, host, port, str(out), str(HEALTH_TIMEOUT_S)]
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def rows(self, t0: float, t1: float) -> list[list[float]]:
        """(when, seconds, status, the machine's 1-minute load average) from ``t0`` to ``t1``."""
        rows = [line.split() for line in self.out.read_text().splitlines()]
        return [[float(x) for x in r] for r in rows if len(r) == 4 and t0 <= float(r[0]) < t1]

    def between(self, t0: float, t1: float) -> list[tuple[float, float, int]]:
        return [(r[0], r[1], int(r[2])) for r in self.rows(t0, t1)]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else max(values, default=0.0)


def never_reader(port: int, model: str) -> socket.socket:
    """A client that asks for a stream and never reads it (closed by the test at the end)."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 24,
            "stream": True,
            "refinement": {"rounds": 2, "stream_rounds": True},
        }
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def slow_headers(port: int, result: dict[str, object]) -> None:
    """Headers one byte every 0.5 s: the server answers 408 and closes at the header bound."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: slow\r\n\r\n":
                sock.sendall(bytes([byte]))
                time.sleep(0.5)
        except OSError:
            pass  # closed by the server
        with contextlib.suppress(OSError):
            result["answer"] = sock.recv(4096)
    result["seconds"] = time.monotonic() - start


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def engine_processes(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


# -- the soak -----------------------------------------------------------------------------------
def test_soak_under_load_and_faults(
    server: ServerProcess, upstream: FakeUpstream, tmp_path: Path
) -> None:
    url, port = server.url, int(server.url.rsplit(":", 1)[1])
    model = httpx.get(url + "/v1/models", trust_env=False).json()["data"][0]["id"]
    me = psutil.Process(server.pid)
    probe = HealthProbe(url, tmp_path / "health.txt")
    tally = Tally()
    start = time.monotonic()

    # warm-up, then the measured traffic, with the faults alongside
    asyncio.run(traffic(url, model, start + WARMUP_S, tally, dead=False, seed=1))
    rss_warm = me.memory_info().rss
    stuck = never_reader(port, model)
    slow: dict[str, object] = {}
    slow_thread = threading.Thread(target=slow_headers, args=(port, slow), daemon=True)
    slow_thread.start()
    asyncio.run(traffic(url, model, start + SOAK_S, tally, dead=False, seed=2))
    live_end = time.monotonic()
    rss_end = me.memory_info().rss
    slow_thread.join(30)
    stuck.close()

    # nothing in flight once the traffic has stopped
    deadline = time.monotonic() + 15
    while True:
        text = httpx.get(url + "/metrics", trust_env=False).text
        inflight = [
            metric(text, "slhf_admission_inflight_requests"),
            metric(text, "slhf_admission_inflight_generations"),
            metric(text, "slhf_engine_running_requests"),
        ]
        if inflight == [0, 0, 0] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    lag = metric(text, "slhf_event_loop_lag_sample_seconds_sum") / max(
        1.0, metric(text, "slhf_event_loop_lag_sample_seconds_count")
    )

    # the engine process killed: documented 503s, fast
    engines = engine_processes(server.pid)
    assert engines, "no engine process to kill (VLLM_ENABLE_V1_MULTIPROCESSING=1?)"
    for p in engines:
        with contextlib.suppress(psutil.Error):
            p.kill()
    killed = time.monotonic()
    dead_tally = Tally()
    asyncio.run(traffic(url, model, killed + 6, dead_tally, dead=True, seed=3))
    dead_end = time.monotonic()
    probe.stop()

    # SIGTERM: exits 0 within its bound
    term = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(timeout=EXIT_BOUND_S + 30)
    gone = time.monotonic() - term

    live = probe.between(start, live_end)
    dead = probe.between(killed + 3, dead_end)  # vLLM notices the death within a second or two
    live_s = [s for _, s, _ in live]
    report = {
        "soak_s": SOAK_S,
        "requests_live": sum(tally.kinds.values()),
        "by_kind": dict(tally.kinds),
        "by_status_live": {f"{s} {c}".strip(): n for (s, c), n in sorted(tally.answers.items())},
        "by_status_dead": {
            f"{s} {c}".strip(): n for (s, c), n in sorted(dead_tally.answers.items())
        },
        "health_probes_live": len(live),
        "health_p50_s": round(statistics.median(live_s), 4),
        "health_p99_s": round(p99(live_s), 4),
        "health_max_s": round(max(live_s), 4),
        "health_dead_p99_s": round(p99([s for _, s, _ in dead]), 4),
        "health_dead_statuses": dict(Counter(st for _, _, st in dead)),
        "machine_load_1min_max": max((r[3] for r in probe.rows(start, live_end)), default=0.0),
        "cpus": os.cpu_count(),
        "rss_warm_mb": round(rss_warm / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_end / rss_warm - 1, 4),
        "mean_loop_lag_s": round(lag, 4),
        "inflight_after": inflight,
        "slow_headers": {
            "seconds": round(float(slow.get("seconds", -1)), 2),
            "answer": str(slow.get("answer", b""))[:40],
        },
        "sigterm_exit_s": round(gone, 2),
        "exit_code": rc,
    }
    print("soak:", json.dumps(report, indent=1))
    Path(os.environ.get("SLHF_SOAK_REPORT", os.devnull)).write_text(json.dumps(report, indent=1))

    assert not tally.bad, tally.bad[:10]
    assert not dead_tally.bad, dead_tally.bad[:10]
    assert tally.answers[(200, "")] > 0 and tally.answers[(429, "overloaded")] > 0, tally.answers
    assert all(status == 200 for _, _, status in live), Counter(st for _, _, st in live)
    assert p99(live_s) <= HEALTH_P99_S, report
    assert dead and all(status == 503 for _, _, status in dead), report["health_dead_statuses"]
    assert p99([s for _, s, _ in dead]) <= HEALTH_P99_S, report
    assert any(s == 503 and c in DEAD_CODES for s, c in dead_tally.answers), dead_tally.answers
    assert rss_end <= rss_warm * (1 + RSS_GROWTH), report
    assert inflight == [0, 0, 0], report
    answer = slow.get("answer", b"")
    assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 408 "), slow
    assert float(slow["seconds"]) < HEADER_TIMEOUT_S + 2, slow  # type: ignore[arg-type]
    assert rc == 0 and gone <= EXIT_BOUND_S, report
    assert "drip" in upstream.seen
