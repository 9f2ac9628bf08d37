"""Two API processes on one real engine (``SLHF_API_SERVERS=2``, the shipped demo model): both
answer, ``/metrics`` counts every process's requests whichever answers, and SIGTERM ends the
whole process tree within the documented bound (docs/reliability.md, "Shutdown")."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ServerProcess, server_env

REQUESTS = 40
GRACE_S, SHUTDOWN_S = 20.0, 10.0
BOUND_S = GRACE_S + 2 + SHUTDOWN_S


def fresh(server: ServerProcess, method: str, path: str, **kwargs: object) -> httpx.Response:
    """One request on its own connection (each connection goes to one API process)."""
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as client:
        return client.request(method, path, **kwargs)  # type: ignore[arg-type]


def refine_requests_total(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "slhf_requests_total" and s.labels["route"] == "/v1/refine"
    )


def sample(text: str, name: str) -> float:
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]
    assert values, name
    return sum(values)


def api_pids(log: Path) -> dict[int, set[int]]:
    """The pids each API process index logged under (JSON lines)."""
    pids: dict[int, set[int]] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "api_server" in entry:
            pids.setdefault(entry["api_server"], set()).add(entry["pid"])
    return pids


def test_two_api_processes_share_one_engine(tmp_path: Path) -> None:
    env = server_env(
        SLHF_API_SERVERS="2",
        SLHF_DRAIN_GRACE_S=str(GRACE_S),
        SLHF_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S),
    )
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the engine core is its own process here
    server = ServerProcess.start(tmp_path / "server.log", env=env)
    try:
        tree = psutil.Process(server.pid).children(recursive=True)  # API and engine processes
        # both are ready (the second may still be attaching when the first answers)
        deadline = time.monotonic() + 120
        ready: set[str] = set()
        while ready != {"0", "1"} and time.monotonic() < deadline:
            r = fresh(server, "GET", "/ready", timeout=10)
            if r.status_code == 200:
                ready.add(r.headers["x-slhf-api-server"])
        assert ready == {"0", "1"}

        def refine(i: int) -> httpx.Response:
            body = {"prompt": f"Question {i}", "rounds": 1}
            return fresh(server, "POST", "/v1/refine", json=body, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(refine, range(REQUESTS)))
        assert [r.status_code for r in answers] == [200] * REQUESTS, answers[0].text
        by_process = Counter(r.headers["x-slhf-api-server"] for r in answers)
        assert set(by_process) == {"0", "1"}, by_process
        pids = api_pids(server.log)  # each logs its index and pid: two children of the server
        assert len(pids[0]) == len(pids[1]) == 1 and pids[0] != pids[1], pids
        api = [p for p in tree if p.pid in pids[0] | pids[1]]
        assert [p.ppid() for p in api] == [server.pid] * 2
        metrics_dir = Path(api[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir()

        # every scrape counts all 40, whichever process answers it
        scraped_by: set[str] = set()
        for _ in range(40):
            r = fresh(server, "GET", "/metrics")
            assert refine_requests_total(r.text) == REQUESTS
            assert sample(r.text, "slhf_admission_limit_generations") == 64  # the shared bound
            assert sample(r.text, "slhf_admission_inflight_generations") == 0
            # vLLM's own counters are summed too: each process's engine client counted its own
            assert sample(r.text, "vllm:prompt_tokens_total") == sum(
                s.value
                for family in text_string_to_metric_families(r.text)
                for s in family.samples
                if s.name == "slhf_tokens_total" and s.labels["kind"] == "prompt"
            )
            scraped_by.add(r.headers["x-slhf-api-server"])
            if scraped_by == {"0", "1"}:
                break
        assert scraped_by == {"0", "1"}

        # SIGTERM with a request in flight (a stream that has begun): it finishes, and the whole
        # tree is gone within the bound
        chat = {  # 9 generations of 64 tokens each: seconds, well within the grace
            "messages": [{"role": "user", "content": "Explain gravity"}],
            "stream": True,
            "max_tokens": 64,
            "ignore_eos": True,
            "refinement": {"rounds": 8, "stop_when_unchanged": False, "stream_rounds": True},
        }
        with (
            httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client,
            client.stream("POST", "/v1/chat/completions", json=chat) as stream,
        ):
            lines = stream.iter_lines()
            assert stream.status_code == 200 and next(lines).startswith("data: {")
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
            code = server.proc.wait(timeout=BOUND_S + 5)
            took = time.monotonic() - t0
    finally:
        server.stop()
    assert code == 0 and took <= BOUND_S, (code, took, server.tail())
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest), rest[-3:]
    log = server.log.read_text()  # the stream ended after the SIGTERM came: it was drained
    assert log.index("SIGTERM: stopping") < log.index("POST /v1/chat/completions 200")
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], alive
    assert not metrics_dir.exists()


def test_a_dead_engine_is_a_503_everywhere_and_a_dead_api_process_stops_the_server(
    tmp_path: Path,
) -> None:
    env = server_env(SLHF_API_SERVERS="2", SLHF_DRAIN_GRACE_S="1", SLHF_SHUTDOWN_TIMEOUT_S="10")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    server = ServerProcess.start(tmp_path / "server.log", env=env)
    try:
        tree = psutil.Process(server.pid).children(recursive=True)
        engine = [p for p in tree if p.name().startswith("VLLM::")]  # the core and its worker
        assert len(engine) >= 1, [p.name() for p in tree]
        for p in engine:
            p.kill()

        # both API processes hear of it and answer 503 engine_dead, as one process does
        dead: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(dead) < 2 and time.monotonic() < deadline:
            r = fresh(server, "GET", "/health", timeout=10)
            if r.status_code == 503:
                dead[r.headers["x-slhf-api-server"]] = r.json()["error"]["code"]
        assert dead == {"0": "engine_dead", "1": "engine_dead"}, dead
        r = fresh(server, "POST", "/v1/refine", json={"prompt": "hi"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"

        # an API process that dies stops everything: status 1, nothing left behind
        api = [p for p in tree if p.ppid() == server.pid and p not in engine]
        pids = api_pids(server.log)
        victim = next(p for p in api if p.pid in pids[0])
        victim.kill()
        code = server.proc.wait(timeout=1 + 2 + 10 + 5)
    finally:
        server.stop()
    assert code == 1, server.tail()
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], alive
