"""Production hardening with a fake engine: auth, request ids, admission, limits, deadlines,
disconnects, drain, engine failure, metrics and JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from slhf_server.app import create_app
from slhf_server.logs import JsonFormatter, request_id_var
from slhf_server.settings import ServerSettings
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_routes import WEIGHTS, assert_envelope

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}

PROTECTED = [
    ("POST", "/v1/refine", {"prompt": "x", "rounds": 1}),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"prompt": "x"}),
    ("GET", "/v1/models", None),
]


def make_app(engine: ScriptedEngine, **settings: object) -> FastAPI:
    s = ServerSettings(max_rounds=4, **settings)  # type: ignore[arg-type]
    return create_app(s, weights=WEIGHTS, engine_factory=lambda w, st: engine)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


@pytest.fixture
def secured(engine: ScriptedEngine) -> Iterator[TestClient]:
    with TestClient(make_app(engine, api_keys=f"other-key,{KEY}")) as c:
        yield c


# -- auth -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_api_route_needs_a_valid_key(
    secured: TestClient, method: str, path: str, body: dict | None
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = secured.request(method, path, json=body, headers=headers)
        err = assert_envelope(r, 401, "API key")
        assert err["type"] == "authentication_error" and r.headers["x-request-id"]
    assert secured.request(method, path, json=body, headers=AUTH).status_code == 200


def test_health_ready_and_metrics_are_open_by_default(secured: TestClient) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert secured.get(path).status_code == 200, path
    assert_envelope(secured.get("/docs"), 401)
    assert_envelope(secured.get("/no-such-route"), 401)


def test_metrics_can_require_a_key_and_keys_come_from_a_file(
    engine: ScriptedEngine, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# ops keys\n\n{KEY}\n")
    app = make_app(engine, api_keys_file=str(keys), metrics_require_auth=True)
    with TestClient(app) as c:
        assert_envelope(c.get("/metrics"), 401)
        assert c.get("/metrics", headers=AUTH).status_code == 200
        assert c.get("/health").status_code == 200


def test_keys_never_appear_in_logs(secured: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        secured.post("/v1/refine", json={"prompt": "x"}, headers=AUTH)
        secured.post("/v1/refine", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cr"})
    assert caplog.records and KEY not in caplog.text and "s3cr" not in caplog.text


# -- request ids ----------------------------------------------------------------------------------
def test_request_id_is_echoed_or_made_on_every_response(engine: ScriptedEngine) -> None:
    with TestClient(make_app(engine)) as c:
        r = c.post("/v1/refine", json={"prompt": "x"}, headers={"X-Request-Id": "abc-123"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
        bad = c.post("/v1/refine", json={"rounds": 1}, headers={"X-Request-Id": "e-1"})
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "e-1"
        assert c.get("/nope").headers["x-request-id"].startswith("req-")
        assert (
            c.get("/health", headers={"X-Request-Id": "bad id\n"})
            .headers["x-request-id"]
            .startswith("req-")
        )


def test_json_logs_carry_the_request_id() -> None:
    token = request_id_var.set("rid-7")
    try:
        record = logging.LogRecord("slhf", logging.INFO, __file__, 1, "hello %s", ("x",), None)
        record.status = 200
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "hello x" and line["request_id"] == "rid-7"
    assert line["level"] == "info" and line["status"] == 200


# -- limits ---------------------------------------------------------------------------------------
def test_limits_are_400_or_413_with_the_numbers(engine: ScriptedEngine) -> None:
    app = make_app(engine, max_body_bytes=2048, max_tokens_cap=50, max_n=4)
    with TestClient(app) as c:
        assert_envelope(c.post("/v1/refine", json={"prompt": "x" * 5000}), 413, "2,048")
        r = c.post("/v1/refine", json={"prompt": "x", "leader": {"max_tokens": 51}})
        assert_envelope(r, 400, "51", "50", param="max_tokens")
        r = c.post("/v1/chat/completions", json={**CHAT, "n": 5})
        assert_envelope(r, 400, "5", "4", param="n")
        r = c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2})
        assert_envelope(r, 400, "6 choices", param="n")
        assert_envelope(c.post("/v1/refine", json={"prompt": "x", "rounds": 5}), 400, "4")
        assert_envelope(c.post("/v1/refine", json={"prompt": "x" * 600}), 400, "512")


def test_slhf_max_n_alone_bounds_n(engine: ScriptedEngine) -> None:
    """No cap of the wire model's own under SLHF_MAX_N: 20 allows n = 17 (and 2 prompts x 10),
    and above it is the settings' error; n = 0 and a non-integer stay a validation 400."""
    with TestClient(make_app(engine, max_n=20)) as c:
        body = {**CHAT, "refinement": {"rounds": 0}}
        r = c.post("/v1/chat/completions", json={**body, "n": 17})
        assert r.status_code == 200, r.text
        assert [ch["index"] for ch in r.json()["choices"]] == list(range(17))
        r = c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 10})
        assert r.status_code == 200 and len(r.json()["choices"]) == 20
        r = c.post("/v1/chat/completions", json={**body, "n": 21})
        err = assert_envelope(r, 400, "21 choices", "the limit is 20 (SLHF_MAX_N)", param="n")
        assert err["code"] == "too_many_choices"
        for bad in (0, 1.5, "2", True):
            assert_envelope(c.post("/v1/chat/completions", json={**body, "n": bad}), 400, param="n")
        # a hostile n (the most digits Python parses) times 2 prompts: still the settings' 400
        huge = '{"prompt": ["a", "b"], "n": %s}' % ("9" * 4300)
        r = c.post("/v1/completions", content=huge, headers={"content-type": "application/json"})
        assert_envelope(r, 400, "more than 1,000,000,000,000,000,000 choices", param="n")


# -- admission ------------------------------------------------------------------------------------
async def _burst(app: FastAPI, count: int, body: dict) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return list(
                await asyncio.gather(
                    *(client.post("/v1/refine", json=body, timeout=30) for _ in range(count))
                )
            )


def test_admission_refuses_over_the_bound_with_retry_after() -> None:
    engine = ScriptedEngine(numbered_script, context=512, delay=0.05)
    app = make_app(engine, max_inflight_generations=6)
    # each request weighs rounds + 1 = 3: two fit, the rest of a simultaneous burst do not
    responses = asyncio.run(_burst(app, 10, {"prompt": "x", "rounds": 2}))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and set(codes) <= {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            err = assert_envelope(r, 429, "6 generations", "needs 3")
            assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    assert engine.peak_running == 2  # the admitted ones ran concurrently (batched)
    assert app.state.admission.weight == 0 and not app.state.admission.tickets


def test_draining_refuses_requests_and_fails_readiness(engine: ScriptedEngine) -> None:
    app = make_app(engine)
    with TestClient(app) as c:
        app.state.admission.draining = True
        assert_envelope(c.get("/ready"), 503, "shutting down")
        assert c.get("/health").status_code == 200
        err = assert_envelope(c.post("/v1/refine", json={"prompt": "x"}), 503)
        assert err["code"] == "draining"


def test_drain_waits_for_in_flight_work_then_aborts_the_rest() -> None:
    engine = ScriptedEngine(numbered_script, context=512, delay=0.3)
    app = make_app(engine)

    async def scenario() -> tuple[int, int, list[int]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                short = asyncio.ensure_future(
                    client.post("/v1/refine", json={"prompt": "a", "rounds": 0})
                )
                long = asyncio.ensure_future(
                    client.post("/v1/refine", json={"prompt": "b", "rounds": 4})
                )
                await asyncio.sleep(0.1)
                aborted = await app.state.admission.drain(grace_s=0.8)
                done = await asyncio.gather(short, long)
                return aborted, len(engine.running), [r.status_code for r in done]

    aborted, running, codes = asyncio.run(scenario())
    assert aborted == 1 and running == 0 and codes == [200, 503]


# -- engine failure -------------------------------------------------------------------------------
def test_a_dead_engine_fails_health_readiness_and_requests(engine: ScriptedEngine) -> None:
    with TestClient(make_app(engine)) as c:
        engine.dead = True
        for r in (c.get("/health"), c.get("/ready"), c.post("/v1/refine", json={"prompt": "x"})):
            assert_envelope(r, 503, "dead")
