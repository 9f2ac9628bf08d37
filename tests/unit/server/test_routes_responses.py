"""``POST /v1/responses`` with a fake engine: the answer, the event stream, the 400s; every
answer and event checked against the official SDK's own types."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from slhf_server.responses_protocol import UNSUPPORTED_RESPONSES
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_routes import assert_envelope
from tests.unit.server.test_routes_openai import MODEL, make_client

EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[TestClient]:
    with make_client(engine) as c:
        yield c


def respond(client: TestClient, **body: object) -> httpx.Response:
    return client.post("/v1/responses", json={"model": MODEL, "input": "Explain gravity", **body})


def events(resp: httpx.Response) -> list[dict]:
    """The stream's events, each checked: an ``event:`` line naming its data's ``type``."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in resp.text.split("\n\n"):
        if not block.strip():
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        ev = json.loads(data[len("data: ") :])
        assert ev["type"] == name[len("event: ") :]
        out.append(ev)
    return out


# -- non-streamed ---------------------------------------------------------------------------------
def test_answer_is_the_final_round_as_the_sdk_reads_it(
    client: TestClient, engine: ScriptedEngine
) -> None:
    body = respond(
        client,
        instructions="Be brief.",
        max_output_tokens=5,
        temperature=0.3,
        refinement={"rounds": 2, "return_trace": True},
    ).json()
    r = Response.model_validate(body)  # the SDK's own model, validated (not constructed)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "answer 2" and r.output[0].type == "message"
    assert (r.instructions, r.max_output_tokens, r.temperature) == ("Be brief.", 5, 0.3)
    assert r.usage is not None and r.usage.output_tokens == 6  # 2 words x 3 generations
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert [x["round"] for x in body["usage"]["by_round"]] == [0, 1, 2]
    assert body["usage"]["by_role"]["follower"]["completion_tokens"] == 4
    trace = body["refinement"]
    assert trace["leader"]["text"] == "answer 0" and len(trace["rounds"]) == 2
    assert engine.calls[0].prompt.startswith("<|system|>Be brief.\n<|user|>Explain gravity")
    assert all(c.params.max_tokens == 5 and c.params.temperature == 0.3 for c in engine.calls)


def test_model_ids_and_refinement_as_on_chat(client: TestClient) -> None:
    leader = respond(client, model=f"{MODEL}:leader").json()
    assert leader["output"][0]["content"][0]["text"] == "answer 0"
    assert leader["refinement"] is None
    given = respond(client, refinement={"rounds": 1, "response": "It falls."}).json()
    assert given["output"][0]["content"][0]["text"] == "answer 1"
    assert_envelope(respond(client, model="nope"), 404, "does not exist")


def test_input_items_with_text_parts_and_history(
    client: TestClient, engine: ScriptedEngine
) -> None:
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
        },
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Why "},
                {"type": "input_text", "text": "so?"},
            ],
        },
    ]
    assert respond(client, input=items).status_code == 200
    assert engine.calls[0].prompt == (
        "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n<|user|>Why so?\n<|assistant|>"
    )


def test_a_final_round_cut_by_max_output_tokens_is_incomplete() -> None:
    engine = ScriptedEngine(lambda call: "one two three four", context=512)
    with make_client(engine) as client:
        body = respond(client, max_output_tokens=2, refinement={"rounds": 0}).json()
    r = Response.model_validate(body)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.output_text == "one two"


# -- streamed -------------------------------------------------------------------------------------
OPENING = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_stream_sends_the_responses_event_sequence(client: TestClient) -> None:
    whole = respond(client, seed=4, refinement={"rounds": 2, "stop_when_unchanged": False}).json()
    evs = events(
        respond(client, seed=4, stream=True, refinement={"rounds": 2, "stop_when_unchanged": False})
    )
    for ev in evs:
        EVENT.validate_python(ev)  # every event is one of the SDK's types
    kinds = [e["type"] for e in evs]
    deltas = [e for e in evs if e["type"] == "response.output_text.delta"]
    assert kinds == OPENING + ["response.output_text.delta"] * len(deltas) + CLOSING
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert len(deltas) == 2 and {d["round"] for d in deltas} == {2}  # the final round, live
    text = "".join(d["delta"] for d in deltas)
    assert text == evs[-4]["text"] == whole["output"][0]["content"][0]["text"] == "answer 2"
    item_ids = {e["item_id"] for e in evs if "item_id" in e}
    assert item_ids == {evs[2]["item"]["id"]}
    created, done = evs[0]["response"], evs[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"] == done["id"] and done["status"] == "completed"
    assert done["usage"]["output_tokens"] == whole["usage"]["output_tokens"]
    assert done["output"][0]["id"] == evs[2]["item"]["id"]


def test_stream_rounds_marks_every_round(client: TestClient) -> None:
    evs = events(respond(client, stream=True, refinement={"rounds": 2, "stream_rounds": True}))
    texts: dict[int, str] = {}
    for e in evs:
        if e["type"] == "response.output_text.delta":
            texts[e["round"]] = texts.get(e["round"], "") + e["delta"]
    assert texts == {0: "answer 0", 1: "answer 1", 2: "answer 2"}
    assert evs[-4]["text"] == "answer 2"


def test_stream_of_an_incomplete_answer_ends_with_response_incomplete() -> None:
    engine = ScriptedEngine(lambda call: "one two three", context=512)
    with make_client(engine) as client:
        evs = events(respond(client, stream=True, max_output_tokens=1))
    assert evs[-1]["type"] == "response.incomplete"
    assert evs[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_failure_mid_stream_is_an_error_event_then_response_failed() -> None:
    engine = ScriptedEngine(numbered_script, context=512, fail_stream_after=1)
    with make_client(engine) as client:
        evs = events(respond(client, stream=True, refinement={"rounds": 1}))
    assert [e["type"] for e in evs[-3:]] == [
        "response.output_text.delta",
        "error",
        "response.failed",
    ]
    error = EVENT.validate_python(evs[-2])
    assert error.type == "error" and "engine failed mid-stream" in error.message
    assert evs[-2]["error"]["code"] == error.code == "engine_error"
    assert evs[-1]["response"]["status"] == "failed"


def test_a_failure_before_any_text_is_a_plain_error(engine: ScriptedEngine) -> None:
    with make_client(engine) as client:
        engine.dead = True
        assert_envelope(respond(client, stream=True), 503, "engine is dead")


# -- what it cannot honour ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("previous_response_id", "resp_1"),
        ("tools", [{"type": "function", "name": "f"}]),
        ("tool_choice", "required"),
        ("background", True),
        ("store", True),
        ("include", ["file_search_call.results"]),
        ("reasoning", {"effort": "low"}),
        ("conversation", "conv_1"),
        ("prompt", {"id": "pmpt_1"}),
        ("truncation", "auto"),
        ("max_tool_calls", 2),
    ],
)
def test_fields_it_cannot_honour_are_400s_naming_them(
    client: TestClient, field: str, value: object
) -> None:
    r = respond(client, **{field: value})
    assert_envelope(r, 400, f"`{field}` is not supported")
    assert r.json()["error"]["param"] == field
    assert r.json()["error"]["code"] == "unsupported_field"


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_RESPONSES))
def test_neutral_values_of_unsupported_fields_are_accepted(client: TestClient, field: str) -> None:
    assert respond(client, **{field: UNSUPPORTED_RESPONSES[field][-1]}).status_code == 200


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
            "input[0].type",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"role": "user"}]}, "input[0].content"),
        ({"input": [{"role": "assistant", "content": "x"}]}, "input"),
        ({"input": []}, "input"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"max_output_tokens": "5"}, "max_output_tokens"),
        ({"input": "x", "nonsense": 1}, "nonsense"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(client: TestClient, body: dict, param: str) -> None:
    r = respond(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_a_lone_surrogate_is_a_400_naming_the_field(client: TestClient) -> None:
    body = json.dumps({"model": MODEL, "input": [{"role": "user", "content": "\ud800"}]})
    r = client.post("/v1/responses", content=body, headers={"Content-Type": "application/json"})
    assert_envelope(r, 400, "surrogate", param="input.0.content")


def test_openapi_documents_the_route(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/v1/responses"]["post"]
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ResponseObject"}
    assert "text/event-stream" in ok and "422" not in op["responses"]
    props = doc["components"]["schemas"]["ResponsesRequest"]["properties"]
    for name in UNSUPPORTED_RESPONSES:
        assert props[name].get("x-slhf-unsupported") is True, name
    assert all(p.get("description") for n, p in props.items()), "a field without a description"


def test_text_format_and_logprobs(client: TestClient, engine: ScriptedEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "name": "A", "schema": schema, "strict": True}
    body = respond(
        client,
        text={"format": fmt},
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        refinement={"rounds": 1, "return_trace": True},
    ).json()
    r = Response.model_validate(body)
    assert [c.params.output_format is not None for c in engine.calls] == [False, True]
    assert all(c.params.logprobs == 2 for c in engine.calls)
    part = r.output[0].content[0]
    assert part.type == "output_text" and part.logprobs is not None
    assert [t.token for t in part.logprobs] == ["answer", " 1"]
    assert len(part.logprobs[0].top_logprobs) == 2
    assert body["text"]["format"]["schema"] == schema and r.top_logprobs == 2
    assert body["refinement"]["rounds"][0]["output_format"] == "json_schema"
    evs = events(respond(client, stream=True, include=["message.output_text.logprobs"]))
    deltas = [e for e in evs if e["type"] == "response.output_text.delta"]
    assert [d["logprobs"][0]["token"] for d in deltas] == ["answer", " 2"]
    assert [t["token"] for t in evs[-4]["logprobs"]] == ["answer", " 2"]
