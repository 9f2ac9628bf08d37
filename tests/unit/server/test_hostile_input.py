"""Hostile requests with a fake engine (docs/reliability.md, "Requests are validated strictly"):
lone surrogates in every text field, sampling values beyond the engine's limits, non-JSON numbers,
lax types -- each a 400 envelope naming the field -- and the one place where an engine's or a
tokenizer's rejection becomes a 400.

Bodies are sent as JSON text written with ``ensure_ascii=True``, so ``"\\ud800"`` travels as the
valid JSON escape a hostile client would send.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from slhf_server.engine import MAX_TEMPERATURE, MAX_TOP_K
from tests.fakes import Call, CharTokenizer, ScriptedEngine, numbered_script
from tests.unit.server.test_hardening import make_app
from tests.unit.server.test_routes import assert_envelope

LONE = "hi \ud800 there"
USER = [{"role": "user", "content": "hi"}]
REFINE, CHAT, COMPLETIONS = "/v1/refine", "/v1/chat/completions", "/v1/completions"


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[TestClient]:
    with TestClient(make_app(engine)) as c:
        yield c


def post(client: TestClient, path: str, body: Any) -> httpx.Response:
    """``body`` as JSON text (lone surrogates as ``\\ud800`` escapes, NaN as ``NaN``)."""
    content = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


# -- row 1 and 2: lone surrogates -----------------------------------------------------------------
SURROGATES = [
    (REFINE, {"prompt": LONE}, "prompt"),
    (REFINE, {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    (REFINE, {"prompt": "x", "response": LONE}, "response"),
    (REFINE, {"prompt": "x", "leader": {"stop": LONE}}, "leader.stop"),
    (REFINE, {"prompt": "x", "follower": {"stop": ["ok", LONE]}}, "follower.stop"),
    (CHAT, {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
        "messages.0.content.0.text",
    ),
    (CHAT, {"messages": USER, "refinement": {"response": LONE}}, "refinement.response"),
    (CHAT, {"messages": USER, "stop": LONE}, "stop"),
    (CHAT, {"messages": USER, "stop": [LONE], "stream": True}, "stop"),
    (CHAT, {"messages": USER, "refinement": {"leader": {"stop": LONE}}}, "refinement.leader.stop"),
    (CHAT, {"messages": USER, "model": LONE}, "model"),
    (COMPLETIONS, {"prompt": LONE}, "prompt"),
    (COMPLETIONS, {"prompt": ["fine", LONE]}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "stop": LONE, "stream": True}, "stop"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATES)
def test_a_lone_surrogate_in_any_text_is_a_400_naming_the_field(
    client: TestClient, engine: ScriptedEngine, path: str, body: dict, param: str
) -> None:
    err = assert_envelope(post(client, path, body), 400, "lone UTF-16 surrogate", param=param)
    assert err["type"] == "invalid_request_error"
    assert not engine.calls


def test_a_surrogate_as_a_field_name_is_a_400(client: TestClient) -> None:
    assert_envelope(post(client, REFINE, {"prompt": "x", "\udfff": 1}), 400, "valid string")


def test_an_error_message_quoting_a_surrogate_is_still_sent() -> None:
    engine = ScriptedEngine(rejecting(ValueError(f"cannot take {LONE!s}")), context=512)
    with TestClient(make_app(engine)) as c:
        err = assert_envelope(post(c, REFINE, {"prompt": "x"}), 400, "cannot take hi \\ud800")
        assert err["code"] == "rejected_by_engine"


def test_valid_unicode_edge_cases_are_served(client: TestClient, engine: ScriptedEngine) -> None:
    text = "NUL\x00 RTL \u202eabc\u202c 4-byte \U0001f600 combining e\u0301 BOM \ufeff"
    r = post(client, REFINE, {"prompt": text, "rounds": 1, "leader": {"stop": "\U0001f600"}})
    assert r.status_code == 200, r.text
    assert text in engine.calls[0].prompt


# -- rows 3 and 4: numbers beyond the engine's limits ---------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (REFINE, {"prompt": "x", "leader": {"temperature": 2.5}}, "leader.temperature"),
        (REFINE, {"prompt": "x", "follower": {"temperature": 10}}, "follower.temperature"),
        (
            CHAT,
            {"messages": USER, "refinement": {"leader": {"temperature": 7.5}}},
            "refinement.leader.temperature",
        ),
        (CHAT, {"messages": USER, "temperature": 2.01}, "temperature"),
        (REFINE, {"prompt": "x", "leader": {"top_k": 2**64}}, "leader.top_k"),
        (REFINE, {"prompt": "x", "follower": {"top_k": 2**63}}, "follower.top_k"),
        (REFINE, {"prompt": "x", "follower": {"top_k": MAX_TOP_K + 1}}, "follower.top_k"),
        (REFINE, {"prompt": "x", "seed": 2**64}, "seed"),
        (CHAT, {"messages": USER, "seed": -(2**63) - 1}, "seed"),
        (REFINE, {"prompt": "x", "deadline_s": 0}, "deadline_s"),
    ],
)
def test_numbers_beyond_the_engines_limits_are_400s(
    client: TestClient, engine: ScriptedEngine, path: str, body: dict, param: str
) -> None:
    assert_envelope(post(client, path, body), 400, param=param)
    assert not engine.calls


def test_the_engines_own_limits_are_accepted(client: TestClient, engine: ScriptedEngine) -> None:
    sampling = {"temperature": MAX_TEMPERATURE, "top_k": MAX_TOP_K, "seed": 2**63 - 1}
    r = post(client, REFINE, {"prompt": "x", "rounds": 1, "leader": sampling})
    assert r.status_code == 200, r.text
    assert engine.calls[0].params.temperature == MAX_TEMPERATURE
    assert engine.calls[0].params.top_k == MAX_TOP_K


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_400s(client: TestClient, literal: str) -> None:
    body = f'{{"prompt": "x", "deadline_s": {literal}, "leader": {{"temperature": {literal}}}}}'
    err = assert_envelope(post(client, REFINE, body), 400, "finite number")
    assert err["param"] in ("deadline_s", "leader.temperature")


# -- strict types (OpenAI's and vLLM's behaviour) -------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": USER, "stream": "yes"}, "stream"),
        (CHAT, {"messages": USER, "stream": 1}, "stream"),
        (REFINE, {"prompt": "x", "rounds": True}, "rounds"),
        (REFINE, {"prompt": "x", "rounds": 1.0}, "rounds"),
        (REFINE, {"prompt": "x", "leader": {"max_tokens": "10"}}, "leader.max_tokens"),
        (CHAT, {"messages": USER, "max_tokens": "10"}, "max_tokens"),
        (CHAT, {"messages": USER, "temperature": "0.5"}, "temperature"),
        (CHAT, {"messages": USER, "n": True}, "n"),
        (CHAT, {"messages": USER, "seed": "7"}, "seed"),
        (REFINE, {"prompt": "x", "stop_when_unchanged": "false"}, "stop_when_unchanged"),
        (REFINE, {"prompt": 5}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, None),
        (COMPLETIONS, {"prompt": [1, 2, 3]}, "prompt"),
        (CHAT, {"messages": USER, "refinement": {"rounds": "2"}}, "refinement.rounds"),
    ],
)
def test_wrong_json_types_are_400s_never_coerced(
    client: TestClient, engine: ScriptedEngine, path: str, body: dict, param: str | None
) -> None:
    err = assert_envelope(post(client, path, body), 400, param=param)
    assert "should be a valid" in err["message"], err["message"]
    assert not engine.calls


def test_an_integer_is_a_valid_number(client: TestClient, engine: ScriptedEngine) -> None:
    r = post(client, CHAT, {"messages": USER, "temperature": 1, "top_p": 1, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert engine.calls[0].params.temperature == 1.0


# -- the one place: engine and tokenizer rejections -----------------------------------------------
class RefusingTokenizer(CharTokenizer):
    """Like a Hugging Face fast tokenizer given a string it cannot take."""

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        if "refuse" in text:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[...]]")
        return super().encode(text, **kwargs)


class RefusingEngine(ScriptedEngine):
    def tokenizer(self, role: Any) -> CharTokenizer:
        return RefusingTokenizer()


def rejecting(exc: Exception) -> Any:
    def script(call: Call) -> str:
        raise exc

    return script


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("temperature must be in [0, 2], got 3.0"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        OverflowError("int too big to convert"),
        TypeError("bad type"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_rejection_is_a_400_on_every_route(exc: Exception, stream: bool) -> None:
    engine = ScriptedEngine(rejecting(exc), context=512)
    with TestClient(make_app(engine)) as c:
        r = post(c, CHAT, {"messages": USER, "stream": stream})
        err = assert_envelope(r, 400, "the leader engine rejected the request", type(exc).__name__)
        assert err["code"] == "rejected_by_engine"
        if not stream:
            r = post(c, REFINE, {"prompt": "x", "rounds": 1})
            assert_envelope(r, 400, "the leader engine rejected the request")
        assert c.get("/health").status_code == 200


def test_a_rejection_mid_chain_is_a_400_and_mid_stream_an_error_event() -> None:
    def script(call: Call) -> str:
        if call.role == "follower":
            raise ValueError("follower refuses")
        return "fine answer"

    engine = ScriptedEngine(script, context=512)
    with TestClient(make_app(engine)) as c:
        r = post(c, REFINE, {"prompt": "x", "rounds": 2})
        assert_envelope(r, 400, "the follower engine rejected the request", "follower refuses")
        r = post(c, CHAT, {"messages": USER, "stream": True, "refinement": {"rounds": 1}})
        assert_envelope(r, 400, "the follower engine rejected the request")  # before any text
        opts = {"rounds": 1, "stream_rounds": True}
        r = post(c, CHAT, {"messages": USER, "stream": True, "refinement": opts})
        assert r.status_code == 200 and "fine" in r.text
        events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        error = json.loads(events[-2][len("data: ") :])["error"]
        assert error["code"] == "rejected_by_engine" and events[-1] == "data: [DONE]"


def test_a_tokenizer_rejection_is_a_400() -> None:
    engine = RefusingEngine(numbered_script, context=512)
    with TestClient(make_app(engine)) as c:
        r = post(c, REFINE, {"prompt": "please refuse this"})
        assert_envelope(r, 400, "the leader tokenizer rejected the request", "TypeError")
        r = post(c, CHAT, {"messages": USER, "refinement": {"response": "refuse"}})
        assert_envelope(r, 400, "the follower tokenizer rejected the request")


class NotVllmError(Exception):
    """An exception class no engine code foresees (a bug in a fake, a new vLLM error)."""


@pytest.mark.parametrize("exc", [NotVllmError("boom"), KeyError("k"), AttributeError("a")])
@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_error_of_any_class_is_a_503_never_a_500(exc: Exception, stream: bool) -> None:
    engine = ScriptedEngine(rejecting(exc), context=512)
    with TestClient(make_app(engine)) as c:
        r = post(c, CHAT, {"messages": USER, "stream": stream})
        err = assert_envelope(r, 503, "the leader engine failed the request", type(exc).__name__)
        assert err["code"] == "engine_error"
        r = post(c, REFINE, {"prompt": "x", "rounds": 1})
        assert assert_envelope(r, 503, "engine failed")["code"] == "engine_error"
        opts = {"rounds": 1, "stream_rounds": True}

        def follower_fails(call: Call) -> str:
            if call.role == "follower":
                raise exc
            return "fine"

        engine.script = follower_fails
        r = post(c, CHAT, {"messages": USER, "stream": True, "refinement": opts})
        events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert r.status_code == 200 and "fine" in r.text  # mid-stream: an error event
        assert json.loads(events[-2][len("data: ") :])["error"]["code"] == "engine_error"


class BrokenHealthEngine(ScriptedEngine):
    async def check_health(self) -> None:
        raise NotVllmError("the health check itself broke")


def test_a_health_check_that_breaks_unexpectedly_is_a_503() -> None:
    with TestClient(make_app(BrokenHealthEngine(numbered_script, context=512))) as c:
        for path in ("/health", "/ready"):
            assert assert_envelope(c.get(path), 503, "NotVllmError")["code"] == "engine_error"
        assert assert_envelope(post(c, REFINE, {"prompt": "x"}), 503, "health")
