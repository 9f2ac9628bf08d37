"""docs/reliability.md's guarantees against a real server and real vLLM: hostile input, a hostile
upstream (served by ``fake_upstream``) and a body that never completes. Loopback only; every wait
is bounded. Timing bounds carry wide margins: this machine is shared."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import (
    HOSTILE_BODY_TIMEOUT_S,
    HOSTILE_UPSTREAM_TIMEOUT_S,
    ServerProcess,
)
from tests.integration.fake_upstream import FakeUpstream

pytestmark = pytest.mark.integration
MARGIN_S = 10.0  # a loaded 2-core machine


def post(server: ServerProcess, path: str, body: object, timeout: float = 60) -> httpx.Response:
    """``body`` as JSON text with ``\\ud800`` escapes (what a hostile client sends)."""
    return httpx.post(
        server.url + path,
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )


def envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def healthy(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = post(server, "/v1/refine", {"prompt": "Hello", "rounds": 1, "leader": {"max_tokens": 4}})
    assert r.status_code == 200, r.text


def rss_mb(server: ServerProcess) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- rows 1-4 -------------------------------------------------------------------------------------
LONE = "x \ud800 y"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/refine", {"prompt": LONE}, "prompt"),
        ("/v1/refine", {"prompt": "hi", "response": LONE}, "response"),
        ("/v1/completions", {"prompt": [LONE]}, "prompt"),
        ("/v1/chat/completions", {"messages": USER, "stop": [LONE], "stream": True}, "stop"),
        ("/v1/refine", {"prompt": "hi", "leader": {"stop": LONE}}, "leader.stop"),
        ("/v1/refine", {"prompt": "hi", "leader": {"temperature": 5.0}}, "leader.temperature"),
        ("/v1/refine", {"prompt": "hi", "follower": {"top_k": 2**64}}, "follower.top_k"),
        ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, "stream"),
        ("/v1/refine", {"prompt": "hi", "rounds": True}, "rounds"),
    ],
)
def test_hostile_values_are_400s_and_the_engine_stays_up(
    hostile_server: ServerProcess, path: str, body: dict, param: str
) -> None:
    assert envelope(post(hostile_server, path, body), 400)["param"] == param
    healthy(hostile_server)


# -- rows 5-7: the fake upstream ------------------------------------------------------------------
def ask_upstream(server: ServerProcess, keyword: str) -> tuple[httpx.Response, float]:
    body = {"prompt": f"please {keyword} now", "rounds": 1, "leader": {"source": "upstream"}}
    t0 = time.monotonic()
    r = post(server, "/v1/refine", body, timeout=120)
    return r, time.monotonic() - t0


def test_a_normal_upstream_answer_is_refined(
    hostile_server: ServerProcess, fake_upstream: FakeUpstream
) -> None:
    r, _ = ask_upstream(hostile_server, "fine")
    assert r.status_code == 200, r.text
    leader = r.json()["leader"]
    assert leader["source"] == "upstream" and leader["text"] == "Fake upstream answer"
    assert fake_upstream.seen[-1] == ""  # no hostile keyword: the plain answer


def test_a_dripping_upstream_is_a_504_at_the_deadline(hostile_server: ServerProcess) -> None:
    # /health answers while the upstream drips: nothing holds the event loop
    lags: list[float] = []

    def probe() -> None:
        for _ in range(4):
            t0 = time.monotonic()
            httpx.get(hostile_server.url + "/health", timeout=30)
            lags.append(time.monotonic() - t0)
            time.sleep(0.3)

    prober = threading.Thread(target=probe)
    prober.start()
    r, elapsed = ask_upstream(hostile_server, "drip")
    prober.join()
    assert envelope(r, 504)["code"] == "upstream_timeout"
    assert HOSTILE_UPSTREAM_TIMEOUT_S - 0.5 < elapsed < HOSTILE_UPSTREAM_TIMEOUT_S + MARGIN_S
    print(f"drip: 504 after {elapsed:.2f} s; /health took at most {max(lags):.3f} s meanwhile")
    assert max(lags) < 2.0


@pytest.mark.parametrize(
    ("keyword", "fragment"),
    [
        ("content-int", "choices.0.message.content"),
        ("content-list", "choices.0.message.content"),
        ("usage-string", "usage"),
        ("usage-list", "usage"),
        ("usage-negative", "usage.prompt_tokens"),
        ("surrogate", "Invalid JSON"),
    ],
)
def test_an_unusable_upstream_answer_is_a_502_naming_the_defect(
    hostile_server: ServerProcess, keyword: str, fragment: str
) -> None:
    r, _ = ask_upstream(hostile_server, keyword)
    err = envelope(r, 502)
    assert err["code"] == "upstream_invalid_answer" and fragment in err["message"], err
    healthy(hostile_server)


@pytest.mark.parametrize("keyword", ["huge", "huge-declared"])
def test_a_50_mb_upstream_answer_is_a_502_in_bounded_time_and_memory(
    hostile_server: ServerProcess, keyword: str
) -> None:
    before = rss_mb(hostile_server)
    r, elapsed = ask_upstream(hostile_server, keyword)
    after = rss_mb(hostile_server)
    err = envelope(r, 502)
    print(f"{keyword}: 502 after {elapsed:.2f} s; server RSS {before:.0f} -> {after:.0f} MB")
    assert err["code"] == "upstream_too_large" and "SLHF_UPSTREAM_MAX_BYTES" in err["message"]
    assert elapsed < MARGIN_S
    assert after - before < 100
    healthy(hostile_server)


def test_an_upstream_error_is_a_502_with_its_message(hostile_server: ServerProcess) -> None:
    r, _ = ask_upstream(hostile_server, "error")
    assert "answered 503: the fake upstream is overloaded" in envelope(r, 502)["message"]


# -- row 8: a body that never completes -----------------------------------------------------------
def test_a_body_shorter_than_its_content_length_gets_a_408_and_a_closed_connection(
    hostile_server: ServerProcess,
) -> None:
    host, port = hostile_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HOSTILE_BODY_TIMEOUT_S + 30) as s:
        head = (
            "POST /v1/refine HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        )
        t0 = time.monotonic()
        s.sendall(head.encode() + b'{"prompt": "x')
        received = b""
        while chunk := s.recv(65536):  # until the server closes the connection
            received += chunk
        elapsed = time.monotonic() - t0
    status_line = received.split(b"\r\n", 1)[0]
    print(f"partial body: {status_line!r} and closed after {elapsed:.2f} s")
    assert status_line.endswith(b"408 Request Timeout"), received[:300]
    assert b'"code":"body_timeout"' in received
    assert HOSTILE_BODY_TIMEOUT_S - 0.5 < elapsed < HOSTILE_BODY_TIMEOUT_S + MARGIN_S
    healthy(hostile_server)


# -- row 9: the process is gone within the grace plus a bound -------------------------------------
GRACE_S, SHUTDOWN_S = 3.0, 2.0


def test_sigterm_leaves_no_process_beyond_grace_plus_shutdown_timeout(
    tmp_path_factory: pytest.TempPathFactory, random_model: Path
) -> None:
    # vLLM's engine in its own processes (the default outside tests): its teardown is the slow part
    log = tmp_path_factory.mktemp("logs") / "teardown.log"
    server = ServerProcess.start(
        log,
        SLHF_MODEL=str(random_model),
        SLHF_MAX_MODEL_LEN="2048",
        SLHF_DRAIN_GRACE_S=str(GRACE_S),
        SLHF_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S),
        VLLM_ENABLE_V1_MULTIPROCESSING="1",
    )
    long = {"max_tokens": 400, "temperature": 1.0, "seed": 3}
    body = {"prompt": "Tell a story", "rounds": 4, "leader": long, "follower": long}
    body["stop_when_unchanged"] = False
    result: dict[str, int] = {}

    def in_flight() -> None:
        result["status"] = post(server, "/v1/refine", body, timeout=120).status_code

    try:
        worker = threading.Thread(target=in_flight)
        worker.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        drained_at = None
        while server.proc.poll() is None and time.monotonic() - t0 < 120:
            if drained_at is None and "drained; aborted" in log.read_text(errors="replace"):
                drained_at = time.monotonic()
            time.sleep(0.05)
        gone_at = time.monotonic()
        worker.join(timeout=30)
    finally:
        server.stop()
    assert drained_at is not None, server.tail()
    total, teardown = gone_at - t0, gone_at - drained_at
    print(f"SIGTERM: drained after {drained_at - t0:.2f} s, gone {teardown:.2f} s later")
    assert server.proc.returncode == 0 and result.get("status") in (200, 503)
    assert teardown < SHUTDOWN_S + 2.0  # vLLM's own teardown took 5-7 s here
    assert total < GRACE_S + 2.0 + SHUTDOWN_S + MARGIN_S
