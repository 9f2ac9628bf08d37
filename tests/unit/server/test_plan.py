"""Planning of structured outputs, logprobs and logit_bias (``slhf_server.plan``), through the
routes with a fake engine: which generations are constrained, what fails instead of returning
an unconstrained answer, the schema bounds; on ``/v1/completions`` too, with its legacy integer
``logprobs`` (its shape, streamed and not)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from slhf_server.plan import schema_depth
from tests.fakes import Call, ScriptedEngine, numbered_script
from tests.unit.server.test_routes import assert_envelope
from tests.unit.server.test_routes_openai import MODEL, USER, chat, make_client, sse_events

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "A", "schema": SCHEMA}}


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[TestClient]:
    with make_client(engine, max_schema_bytes=1024, max_schema_depth=6) as c:
        yield c


def formats(engine: ScriptedEngine) -> list[tuple[str, str | None]]:
    return [
        (c.role, None if c.params.output_format is None else c.params.output_format.kind)
        for c in engine.calls
    ]


@pytest.mark.parametrize(
    "model, rounds, constrained",
    [
        (MODEL, 2, [("leader", None), ("follower", "json_schema"), ("follower", "json_schema")]),
        (MODEL, 0, [("leader", "json_schema")]),
        (f"{MODEL}:leader", None, [("leader", "json_schema")]),
    ],
)
def test_the_rounds_that_can_end_the_chain_are_constrained(
    client: TestClient,
    engine: ScriptedEngine,
    model: str,
    rounds: int | None,
    constrained: list,
) -> None:
    opts = {"return_trace": True, "stop_when_unchanged": False}
    if rounds is not None:
        opts["rounds"] = rounds
    body = chat(client, model=model, response_format=JSON_SCHEMA, refinement=opts).json()
    assert formats(engine) == constrained
    trace = body["choices"][0]["refinement"]
    assert [s.get("output_format") for s in [trace["leader"], *trace["rounds"]]] == [
        f for _, f in constrained
    ]
    schema = engine.calls[-1].params.output_format.schema  # type: ignore[union-attr]
    assert schema == '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'


def test_a_leader_format_of_its_own_and_json_object(
    client: TestClient, engine: ScriptedEngine
) -> None:
    chat(
        client,
        response_format={"type": "json_object"},
        refinement={"rounds": 1, "leader": {"response_format": {"type": "json_object"}}},
    )
    assert formats(engine) == [("leader", "json_object"), ("follower", "json_object")]
    engine.calls.clear()
    chat(client, response_format={"type": "text"}, refinement={"rounds": 1})
    assert formats(engine) == [("leader", None), ("follower", None)]


def test_a_given_answer_cannot_be_returned_in_a_format(client: TestClient) -> None:
    r = chat(client, response_format=JSON_SCHEMA, refinement={"rounds": 0, "response": "x"})
    assert_envelope(r, 400, "cannot constrain a given or upstream", param="response_format")
    assert (
        chat(
            client, response_format=JSON_SCHEMA, refinement={"rounds": 1, "response": "x"}
        ).status_code
        == 200
    )


def test_a_deadline_before_a_constrained_round_is_a_504_never_the_leader_answer() -> None:
    def slow_follower(call: Call) -> str:
        return "answer"

    engine = ScriptedEngine(slow_follower, context=512, delay=0.3)
    with make_client(engine) as client:
        opts = {"rounds": 1, "deadline_s": 0.45}
        assert_envelope(
            chat(client, response_format=JSON_SCHEMA, refinement=opts), 504, "requested format"
        )
        plain = chat(client, refinement=opts).json()  # no format: the Leader's answer is fine
    assert plain["choices"][0]["finish_reason"] == "deadline"


def test_a_first_answer_that_leaves_no_room_is_a_400_in_a_format() -> None:
    engine = ScriptedEngine(lambda call: "w " * 200, context=300)
    with make_client(engine) as client:
        r = chat(client, response_format=JSON_SCHEMA, max_tokens=250, refinement={"rounds": 1})
        assert_envelope(r, 400, "no room", param="response_format")
        plain = chat(client, max_tokens=250, refinement={"rounds": 1, "return_trace": True})
    assert plain.json()["choices"][0]["refinement"]["stopped_reason"] == "context_length"


@pytest.mark.parametrize(
    "schema, fragment",
    [
        ({"type": "object", "description": "x" * 2000}, "SLHF_MAX_SCHEMA_BYTES"),
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}, "SLHF_MAX_SCHEMA_DEPTH"),
        ({"a": [[[[[[1]]]]]]}, "SLHF_MAX_SCHEMA_DEPTH"),
    ],
)
def test_a_schema_past_the_bounds_is_a_400(client: TestClient, schema: dict, fragment: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "A", "schema": schema}}
    r = chat(client, response_format=fmt)
    err = assert_envelope(r, 400, fragment, param="response_format")
    assert err["code"] == "schema_too_large"
    r = client.post("/v1/refine", json={"prompt": "x", "follower": {"response_format": fmt}})
    assert_envelope(r, 400, fragment)


def test_schema_depth_counts_without_recursion() -> None:
    deep: object = 1
    for _ in range(100_000):
        deep = [deep]
    assert schema_depth(deep, 32) == 33  # stops counting past the limit
    assert schema_depth({"a": [1, {"b": 2}]}, 32) == 3
    assert schema_depth("x", 32) == 0


def test_logprobs_and_logit_bias_reach_every_generation(
    client: TestClient, engine: ScriptedEngine
) -> None:
    chat(client, logprobs=True, top_logprobs=2, logit_bias={"7": -100, "3": 5.5})
    assert all(c.params.logprobs == 2 for c in engine.calls)
    assert all(c.params.logit_bias == ((3, 5.5), (7, -100.0)) for c in engine.calls)
    engine.calls.clear()
    chat(client, logprobs=True)
    assert all(c.params.logprobs == 0 for c in engine.calls)
    engine.calls.clear()
    chat(client)
    assert all(c.params.logprobs is None and c.params.logit_bias == () for c in engine.calls)


def test_refine_takes_the_fields_per_role(client: TestClient, engine: ScriptedEngine) -> None:
    body = client.post(
        "/v1/refine",
        json={
            "messages": USER,
            "rounds": 1,
            "leader": {"logprobs": True},
            "follower": {"response_format": JSON_SCHEMA, "logit_bias": {"1": 2}},
        },
    ).json()
    assert formats(engine) == [("leader", None), ("follower", "json_schema")]
    assert engine.calls[0].params.logprobs == 0 and engine.calls[1].params.logprobs is None
    assert engine.calls[1].params.logit_bias == ((1, 2.0),)
    assert [e["token"] for e in body["leader"]["logprobs"]] == ["answer", " 0"]
    assert "logprobs" not in body["rounds"][0]
    assert body["rounds"][0]["output_format"] == "json_schema"


# -- /v1/completions ------------------------------------------------------------------------------
def complete(client: TestClient, **body: object) -> httpx.Response:
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "Explain", **body})


def test_completions_constrain_the_rounds_that_can_end_the_chain_as_chat(
    client: TestClient, engine: ScriptedEngine
) -> None:
    opts = {"rounds": 2, "return_trace": True, "stop_when_unchanged": False}
    body = complete(client, response_format=JSON_SCHEMA, refinement=opts).json()
    assert formats(engine) == [
        ("leader", None),
        ("follower", "json_schema"),
        ("follower", "json_schema"),
    ]
    trace = body["choices"][0]["refinement"]
    assert [s.get("output_format") for s in trace["rounds"]] == ["json_schema"] * 2
    engine.calls.clear()
    complete(client, response_format={"type": "json_object"}, refinement={"rounds": 0})
    assert formats(engine) == [("leader", "json_object")]
    r = complete(client, response_format=JSON_SCHEMA, refinement={"rounds": 0, "response": "x"})
    assert_envelope(r, 400, "cannot constrain a given or upstream", param="response_format")
    deep = {"type": "json_schema", "json_schema": {"name": "A", "schema": {"a": [[[[[[1]]]]]]}}}
    err = assert_envelope(complete(client, response_format=deep), 400, "SLHF_MAX_SCHEMA_DEPTH")
    assert err["code"] == "schema_too_large" and err["param"] == "response_format"


def test_completions_logprobs_are_the_final_rounds_tokens_in_the_legacy_form(
    client: TestClient, engine: ScriptedEngine
) -> None:
    opts = {"rounds": 2, "return_trace": True, "stop_when_unchanged": False}
    choice = complete(client, logprobs=1, refinement=opts).json()["choices"][0]
    assert choice["text"] == "answer 2"
    assert all(c.params.logprobs == 1 for c in engine.calls)
    # the fake: -0.5 per word, alternatives alt0 (-1.0), alt1 (-2.0), ...; the sampled token
    # is always among the alternatives; " 2" starts after "answer" (6 characters)
    assert choice["logprobs"] == {
        "tokens": ["answer", " 2"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"alt0": -1.0, "answer": -0.5}, {"alt0": -1.0, " 2": -0.5}],
        "text_offset": [0, 6],
    }
    trace = choice["refinement"]
    assert [e["token"] for e in trace["rounds"][-1]["logprobs"]] == choice["logprobs"]["tokens"]
    assert [e["token"] for e in trace["leader"]["logprobs"]] == ["answer", " 0"]
    zero = complete(client, logprobs=0, refinement={"rounds": 1}).json()["choices"][0]
    assert zero["logprobs"]["top_logprobs"] == [{"answer": -0.5}, {" 1": -0.5}]
    engine.calls.clear()
    assert complete(client).json()["choices"][0]["logprobs"] is None
    assert all(c.params.logprobs is None for c in engine.calls)


@pytest.mark.parametrize(
    "body, fragment, param, code",
    [
        ({"logprobs": 6}, "logprobs:", "logprobs", "invalid_request"),
        ({"logprobs": -1}, "logprobs:", "logprobs", "invalid_request"),
        ({"logprobs": True}, "logprobs:", "logprobs", "invalid_request"),
        ({"top_logprobs": 2}, "`top_logprobs` is not supported", "top_logprobs", None),
        ({"response_format": {"type": "xml"}}, "response_format.type", None, "invalid_request"),
    ],
)
def test_completions_format_fields_out_of_bounds_are_400s(
    client: TestClient, body: dict, fragment: str, param: str | None, code: str | None
) -> None:
    err = assert_envelope(complete(client, **body), 400, fragment, param=param)
    assert err["code"] == (code or "unsupported_field")


def test_completions_streamed_chunks_carry_their_tokens_with_offsets_in_their_round() -> None:
    def logprob_chunks(events: list[dict | str]) -> list[dict]:
        return [
            c["choices"][0]["logprobs"]
            for c in events
            if isinstance(c, dict) and c["choices"] and c["choices"][0]["text"]
        ]

    with make_client(ScriptedEngine(numbered_script, context=512)) as client:
        events = sse_events(complete(client, stream=True, logprobs=2, refinement={"rounds": 1}))
    chunks = logprob_chunks(events)
    assert [(c["tokens"], c["text_offset"]) for c in chunks] == [(["answer"], [0]), ([" 1"], [6])]
    assert chunks[1]["top_logprobs"] == [{"alt0": -1.0, "alt1": -2.0, " 1": -0.5}]
    # stream_rounds: each round's offsets start at its own text
    with make_client(ScriptedEngine(numbered_script, context=512)) as client:
        opts = {"rounds": 1, "stream_rounds": True}
        events = sse_events(complete(client, stream=True, logprobs=0, refinement=opts))
    assert [c["text_offset"] for c in logprob_chunks(events)] == [[0], [6], [0], [6]]
    # an early stop sends the answer in one piece, with all its tokens
    with make_client(ScriptedEngine(lambda call: "same text", context=512)) as client:
        events = sse_events(complete(client, stream=True, logprobs=0, refinement={"rounds": 3}))
    assert [(c["tokens"], c["text_offset"]) for c in logprob_chunks(events)] == [
        (["same", " text"], [0, 4])
    ]
