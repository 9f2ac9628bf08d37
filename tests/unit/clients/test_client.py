"""The real client against the real app in-process (fake engine), and its retries.

Sync tests use ``TestClient`` (an ``httpx.Client`` whose transport is the app, lifespan run);
async tests use ``httpx.ASGITransport`` inside the app's own lifespan.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from slhf_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    BadRequestError,
    ChatChoice,
    Client,
    NotFoundError,
    RateLimitError,
    Refinement,
    RetryPolicy,
    ServerError,
    TokenLogprob,
    TopLogprob,
)
from slhf_server.app import create_app
from slhf_server.settings import ServerSettings
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_routes import WEIGHTS


def make_app(engine: ScriptedEngine) -> FastAPI:
    return create_app(
        ServerSettings(max_rounds=4), weights=WEIGHTS, engine_factory=lambda w, s: engine
    )


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[Client]:
    with TestClient(make_app(engine)) as http:
        yield Client("http://testserver", http_client=http, max_retries=0)


# -- against the app ------------------------------------------------------------------------
def test_refine_returns_typed_leader_rounds_and_final(client: Client) -> None:
    r = client.refine("Explain gravity", rounds=2, seed=3)
    assert r.model == "fake-slhf" and r.id.startswith("refine-")
    assert r.leader.text == "answer 0" and r.leader.source == "leader"
    assert [x.round for x in r.rounds] == [1, 2]
    assert r.texts == ["answer 0", "answer 1", "answer 2"]
    assert r.final == "answer 2" and r.stopped_reason == "max_rounds"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0


def test_refine_given_response_and_messages(client: Client) -> None:
    r = client.refine([{"role": "user", "content": "Hi"}], response="my answer", rounds=1)
    assert r.leader.source == "given" and r.leader.text == "my answer"
    assert len(r.rounds) == 1


def test_chat_returns_content_usage_and_trace(client: Client) -> None:
    c = client.chat("Explain gravity", rounds=2, return_trace=True)
    assert c.content == "answer 2"
    trace = c.choices[0].refinement
    assert trace is not None and trace.texts == ["answer 0", "answer 1", "answer 2"]
    assert set(c.usage.by_role) == {"leader", "follower"} and len(c.usage.by_round) == 3


def test_chat_stream_rounds_yields_every_round_then_trace_and_usage(client: Client) -> None:
    chunks = list(client.chat_stream("Explain gravity", rounds=2, stream_rounds=True))
    by_round: dict[int, str] = {}
    for ch in chunks:
        if ch.text and ch.round is not None:
            by_round[ch.round] = by_round.get(ch.round, "") + ch.text
    assert by_round == {0: "answer 0", 1: "answer 1", 2: "answer 2"}
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert chunks[-1].index == -1 and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0
    # the README's `print(chunk.round, chunk.text)` loop: no "None", no empty chunk
    assert all(isinstance(ch.round, int) for ch in chunks)
    assert all(ch.text or ch.finish_reason or ch.usage for ch in chunks)
    assert chunks[-1].round == 2


def test_models_lists_the_model_and_its_leader_variant(client: Client) -> None:
    models = client.models()
    assert [m.id for m in models] == ["fake-slhf", "fake-slhf:leader"]
    assert models[0].slhf["rounds"] == 2 and models[1].parent == "fake-slhf"
    assert client.health() == {"status": "ok"} and client.ready()["status"] == "ready"


def test_unknown_model_is_not_found_with_the_envelope(client: Client) -> None:
    with pytest.raises(NotFoundError) as e:
        client.refine("Hi", model="nope")
    assert e.value.status_code == 404 and e.value.param == "model"
    assert e.value.code == "model_not_found" and "nope" in e.value.message


def test_invalid_request_is_bad_request_naming_the_numbers(client: Client) -> None:
    with pytest.raises(BadRequestError) as e:
        client.refine("Hi", rounds=99)
    assert e.value.status_code == 400 and "99" in e.value.message


def test_dead_engine_is_a_server_error(client: Client, engine: ScriptedEngine) -> None:
    engine.dead = True
    with pytest.raises(ServerError) as e:
        client.refine("Hi", rounds=1)
    assert e.value.status_code == 503


def test_error_after_the_stream_started_is_raised(client: Client, engine: ScriptedEngine) -> None:
    engine.fail_stream_after = 1
    with pytest.raises(ServerError, match="mid-stream"):
        list(client.chat_stream("Hi", rounds=1))


def test_async_client_refines_chats_and_streams(engine: ScriptedEngine) -> None:
    async def scenario() -> None:
        app = make_app(engine)
        async with app.router.lifespan_context(app):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
            async with AsyncClient("http://testserver/v1", http_client=http) as c:
                r, chat = await asyncio.gather(c.refine("Q", rounds=1), c.chat("Q", rounds=2))
                text = [ch.text async for ch in c.chat_stream("Q", rounds=2)]
                with pytest.raises(NotFoundError):
                    await c.chat("Q", model="nope")
            await http.aclose()
        assert r.final == "answer 1" and chat.content == "answer 2"
        assert "".join(text) == "answer 2"

    asyncio.run(scenario())


# -- structured outputs and logprobs -------------------------------------------------------
JSON_OBJECT = {"type": "json_object"}


def test_refine_returns_every_rounds_logprobs_and_format(
    client: Client, engine: ScriptedEngine
) -> None:
    r = client.refine("Q", rounds=2, response_format=JSON_OBJECT, logprobs=True, top_logprobs=1)
    # rounds >= 1: the Leader answers freely, the Follower's rounds (which end the chain) do not
    formats = [
        None if c.params.output_format is None else c.params.output_format.kind
        for c in engine.calls
    ]
    assert formats == [None, "json_object", "json_object"]
    assert [r.leader.output_format, *(x.output_format for x in r.rounds)] == formats
    assert all(c.params.logprobs == 1 for c in engine.calls)
    assert r.leader.logprobs is not None and [t.token for t in r.leader.logprobs] == [
        "answer",
        " 0",
    ]
    final = r.final_logprobs
    assert final is not None and [t.token for t in final] == ["answer", " 2"]
    assert final is r.rounds[-1].logprobs
    assert final[0].logprob == -0.5 and final[0].bytes == list(b"answer")
    assert [(a.token, a.logprob) for a in final[0].top_logprobs] == [("alt0", -1.0)]
    plain = client.refine("Q", rounds=1)
    assert plain.final_logprobs is None and plain.rounds[0].output_format is None


def sent_refine_bodies(**kwargs: object) -> list[dict]:
    """The ``/v1/refine`` bodies the sync and the async client send for ``refine(**kwargs)``."""
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"leader": {"text": "a"}, "rounds": [], "final": "a"})

    transport = httpx.MockTransport(handler)
    with Client("http://x", http_client=httpx.Client(transport=transport)) as c:
        c.refine("Q", **kwargs)  # type: ignore[arg-type]

    async def go() -> None:
        async with AsyncClient("http://x", http_client=httpx.AsyncClient(transport=transport)) as c:
            await c.refine("Q", **kwargs)  # type: ignore[arg-type]

    asyncio.run(go())
    return bodies


@pytest.mark.parametrize(
    "kwargs, leader, follower",
    [
        # rounds >= 1: only the Follower's rounds are constrained (as on the OpenAI routes)
        ({"rounds": 2}, {"logprobs": True}, {"logprobs": True, "response_format": JSON_OBJECT}),
        # 0 rounds, or the model's default (unknown here): the Leader's answer may be the answer
        ({"rounds": 0}, {"logprobs": True, "response_format": JSON_OBJECT}, None),
        ({}, {"logprobs": True, "response_format": JSON_OBJECT}, None),
        # a role's own values win
        (
            {"rounds": 1, "follower": {"logprobs": False, "max_tokens": 5}},
            {"logprobs": True},
            {"logprobs": False, "max_tokens": 5, "response_format": JSON_OBJECT},
        ),
    ],
)
def test_refine_sends_the_answer_format_to_the_rounds_that_can_end_the_chain(
    kwargs: dict, leader: dict, follower: dict | None
) -> None:
    follower = follower or leader
    for body in sent_refine_bodies(response_format=JSON_OBJECT, logprobs=True, **kwargs):
        assert body["leader"] == leader and body["follower"] == follower
    for body in sent_refine_bodies(rounds=1):  # nothing asked: no per-role objects
        assert "leader" not in body and "follower" not in body


def test_hostile_logprobs_in_a_body_read_as_what_they_can_be() -> None:
    step = {
        "text": "a",
        "output_format": "json_schema",
        "logprobs": [
            {"token": 5, "logprob": "bad", "bytes": [1, "a"], "top_logprobs": [1, {"token": "b"}]},
            3,
            {"token": "c", "logprob": -1, "top_logprobs": "x"},
        ],
    }
    r = Refinement.from_dict({"leader": {**step, "logprobs": "x"}, "rounds": [step, {"round": 2}]})
    assert r.leader.logprobs is None and r.leader.output_format == "json_schema"
    assert r.rounds[0].logprobs == [
        TokenLogprob("5", 0.0, [1], [TopLogprob("b", 0.0, [])]),
        TokenLogprob("c", -1.0, [], []),
    ]
    assert r.final_logprobs is None  # the last round has none
    choice = ChatChoice.from_dict({"logprobs": {"content": [{"token": "t", "logprob": -2.5}]}})
    assert choice.logprobs == [TokenLogprob("t", -2.5)]
    assert ChatChoice.from_dict({"logprobs": None}).logprobs is None


# -- configuration --------------------------------------------------------------------------
def test_base_url_and_api_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    monkeypatch.setenv("SLHF_BASE_URL", "http://env-host:9000/v1/")
    monkeypatch.setenv("SLHF_API_KEY", "sk-env")
    c = Client(http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    c.health()
    assert str(seen[0].url) == "http://env-host:9000/health"
    assert seen[0].headers["authorization"] == "Bearer sk-env"
    c = Client(
        "http://arg:1", "sk-arg", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    c.health()
    assert str(seen[1].url) == "http://arg:1/health"
    assert seen[1].headers["authorization"] == "Bearer sk-arg"


# -- retries --------------------------------------------------------------------------------
def scripted(*responses: httpx.Response | Exception) -> tuple[Client, list[float], list[int]]:
    """A client whose server answers ``responses`` in order; records sleeps and attempts."""
    sleeps: list[float] = []
    attempts: list[int] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    policy = RetryPolicy(max_retries=3, initial_backoff_s=1.0, max_backoff_s=2.0, jitter=0.0)
    c = Client(
        "http://x", http_client=httpx.Client(transport=httpx.MockTransport(handler)), retry=policy
    )
    c._sleep = sleeps.append
    return c, sleeps, attempts


def ok() -> httpx.Response:
    return httpx.Response(200, json={"status": "ok"})


def envelope(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": f"status {status}", "type": "x", "param": None, "code": status}}
    return httpx.Response(status, json=body, headers=headers)


def test_retry_honours_retry_after() -> None:
    c, sleeps, _ = scripted(envelope(429, {"Retry-After": "0.25"}), envelope(503), ok())
    assert c.health() == {"status": "ok"}
    assert sleeps == [0.25, 2.0]  # Retry-After, then backoff 1.0 * 2**1


def test_backoff_is_capped_and_the_last_error_raised() -> None:
    c, sleeps, attempts = scripted(envelope(500), envelope(502), envelope(504), envelope(429))
    with pytest.raises(RateLimitError) as e:
        c.health()
    assert len(attempts) == 4 and sleeps == [1.0, 2.0, 2.0]
    assert e.value.status_code == 429


def test_too_long_retry_after_falls_back_to_backoff() -> None:
    c, sleeps, _ = scripted(envelope(429, {"Retry-After": "3600"}), ok())
    c.health()
    assert sleeps == [1.0]


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(status: int) -> None:
    c, sleeps, attempts = scripted(envelope(status), ok())
    with pytest.raises(Exception) as e:
        c.health()
    assert len(attempts) == 1 and sleeps == []
    assert getattr(e.value, "status_code", None) == status


def test_408_and_409_are_retried() -> None:
    c, _, attempts = scripted(envelope(408), envelope(409), ok())
    assert c.health() == {"status": "ok"} and len(attempts) == 3


def test_connection_errors_and_timeouts_are_retried_then_raised() -> None:
    boom = httpx.ConnectError("refused")
    c, _, attempts = scripted(boom, boom, boom, boom)
    with pytest.raises(APIConnectionError, match="cannot reach"):
        c.health()
    assert len(attempts) == 4
    slow = httpx.ReadTimeout("slow")
    c, _, _ = scripted(slow, slow, slow, slow)
    with pytest.raises(APITimeoutError):
        c.health()


def test_non_envelope_error_body_still_raises_by_status() -> None:
    c, _, _ = scripted(httpx.Response(502, text="Bad Gateway (proxy)"), *[envelope(502)] * 3)
    with pytest.raises(ServerError, match="502"):
        c.health()
