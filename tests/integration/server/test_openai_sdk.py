"""The official ``openai`` SDK (sync, async, streaming) against the real server process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pydantic
import pytest

from tests.integration.conftest import UPSTREAM_NAME, ServerProcess

pytestmark = pytest.mark.integration

GREEDY = {"temperature": 0.0, "max_tokens": 12}
USER = [{"role": "user", "content": "Explain gravity"}]


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(shared_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with sdk(shared_server) as c:
        yield c


@pytest.fixture(scope="module")
def name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def refinement(**kw: object) -> dict:
    return {"refinement": kw}


def test_models_list_has_the_refined_and_leader_ids(client: openai.OpenAI, name: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [name, name + ":leader"]
    assert all(m.owned_by == "slhf" and m.created > 0 for m in models)
    assert models[0].model_extra["max_model_len"] == 512


def test_chat_with_rounds_and_trace(client: openai.OpenAI, name: str) -> None:
    r = client.chat.completions.create(
        model=name,
        messages=USER,
        max_tokens=10,
        extra_body=refinement(rounds=2, return_trace=True, stop_when_unchanged=False),
    )
    choice = r.choices[0]
    trace = choice.model_extra["refinement"]
    assert trace["leader"]["source"] == "leader" and len(trace["rounds"]) == 2
    assert choice.message.content == trace["rounds"][-1]["text"]
    assert choice.finish_reason in ("stop", "length")
    steps = [trace["leader"], *trace["rounds"]]
    assert r.usage.completion_tokens == sum(s["usage"]["completion_tokens"] for s in steps)
    extra = r.usage.model_extra
    assert [x["round"] for x in extra["by_round"]] == [0, 1, 2]
    assert extra["by_role"]["follower"]["completion_tokens"] == sum(
        s["usage"]["completion_tokens"] for s in trace["rounds"]
    )


def test_chat_final_equals_refine_final_for_the_same_seed(
    client: openai.OpenAI, shared_server: ServerProcess, name: str
) -> None:
    chat = client.chat.completions.create(
        model=name,
        messages=USER,
        seed=5,
        extra_body=refinement(rounds=2, stop_when_unchanged=False),
    )
    refined = httpx.post(
        shared_server.url + "/v1/refine",
        json={"messages": USER, "rounds": 2, "seed": 5, "stop_when_unchanged": False},
        timeout=120,
    ).json()
    assert chat.choices[0].message.content == refined["final"]


def test_seeded_request_repeats_and_another_seed_differs(client: openai.OpenAI, name: str) -> None:
    def text(seed: int) -> str:
        r = client.chat.completions.create(
            model=name, messages=USER, seed=seed, extra_body=refinement(rounds=1)
        )
        return r.choices[0].message.content or ""

    assert text(21) == text(21)
    assert text(21) != text(22)


def test_n2_gives_two_different_refined_choices(client: openai.OpenAI, name: str) -> None:
    r = client.chat.completions.create(
        model=name, messages=USER, n=2, seed=3, extra_body=refinement(rounds=1, return_trace=True)
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert all(len(c.model_extra["refinement"]["rounds"]) == 1 for c in r.choices)
    assert r.usage.model_extra["by_round"][0]["completion_tokens"] == sum(
        c.model_extra["refinement"]["leader"]["usage"]["completion_tokens"] for c in r.choices
    )


def test_stop_ends_every_round_at_the_stop_string(client: openai.OpenAI, name: str) -> None:
    plain = client.chat.completions.create(model=name + ":leader", messages=USER, **GREEDY)
    text = plain.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.chat.completions.create(
        model=name + ":leader", messages=USER, stop=[stop], **GREEDY
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_stream_sends_the_final_round(client: openai.OpenAI, name: str) -> None:
    kw = dict(model=name, messages=USER, seed=9, **GREEDY)
    body = refinement(rounds=2, stop_when_unchanged=False)
    whole = client.chat.completions.create(extra_body=body, **kw)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, extra_body=body, **kw
    )  # type: ignore[call-overload]
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1  # token by token, not one piece
    assert {c.choices[0].model_extra["round"] for c in content} == {2}
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_rounds_marks_every_round(client: openai.OpenAI, name: str) -> None:
    stream = client.chat.completions.create(
        model=name,
        messages=USER,
        stream=True,
        max_tokens=8,
        extra_body=refinement(rounds=2, stream_rounds=True, stop_when_unchanged=False),
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                r = c.model_extra["round"]
                texts[r] = texts.get(r, "") + c.delta.content
    assert sorted(texts) == [0, 1, 2]


def test_completions_endpoint(client: openai.OpenAI, name: str) -> None:
    r = client.completions.create(
        model=name, prompt="Describe the sea", max_tokens=8, extra_body=refinement(rounds=1)
    )
    assert r.object == "text_completion" and r.choices[0].text
    chunks = list(
        client.completions.create(model=name, prompt="Describe the sea", max_tokens=8, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_async_client_and_async_stream(shared_server: ServerProcess, name: str) -> None:
    async def go() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(
            base_url=shared_server.url + "/v1", api_key="x", max_retries=0, timeout=120
        ) as c:
            many = await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model=name, messages=[{"role": "user", "content": f"Q{i}"}], max_tokens=8
                    )
                    for i in range(6)
                )
            )
            stream = await c.chat.completions.create(
                model=name, messages=USER, max_tokens=8, stream=True
            )
            streamed = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            return [m.choices[0].message.content or "" for m in many], streamed

    texts, streamed = asyncio.run(go())
    assert len(texts) == 6 and all(texts) and streamed


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"model": "nope"}, openai.NotFoundError, "does not exist"),
        ({"extra_body": refinement(rounds=5)}, openai.BadRequestError, "between 0 and 4"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            openai.BadRequestError,
            "`tools` is not supported",
        ),
        ({"n": 0}, openai.BadRequestError, "n"),
        ({"messages": []}, openai.BadRequestError, "at least one message"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            openai.BadRequestError,
            "only 'text'",
        ),
        (
            {"messages": [{"role": "user", "content": "w " * 600}]},
            openai.BadRequestError,
            "max_model_len",
        ),
        ({"model": "{name}@upstream"}, openai.BadRequestError, "SLHF_UPSTREAM_BASE_URL"),
    ],
)
def test_bad_input_raises_the_sdk_error(
    client: openai.OpenAI, name: str, kwargs: dict, error: type, fragment: str
) -> None:
    args = {"model": name, "messages": USER, **kwargs}
    args["model"] = args["model"].format(name=name)
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    assert fragment in str(info.value)


# -- upstream: a Qwen2-family server of ours gives the first answer, a Llama Follower refines it ---
def test_upstream_answers_are_refined(
    lora_server: ServerProcess, upstream_server: ServerProcess
) -> None:
    with sdk(lora_server) as ours, sdk(upstream_server) as theirs:
        name = ours.models.list().data[0].id
        assert name + "@upstream" in [m.id for m in ours.models.list().data]
        r = ours.chat.completions.create(
            model=name + "@upstream",
            messages=USER,
            extra_body=refinement(
                rounds=1, return_trace=True, leader=GREEDY, stop_when_unchanged=False
            ),
        )
        direct = theirs.chat.completions.create(
            model=UPSTREAM_NAME + ":leader", messages=USER, **GREEDY
        )
    trace = r.choices[0].model_extra["refinement"]
    assert trace["leader"]["source"] == "upstream"
    assert trace["leader"]["text"] == direct.choices[0].message.content  # greedy: same answer
    assert len(trace["rounds"]) == 1 and r.choices[0].message.content == trace["rounds"][0]["text"]
    body = httpx.post(
        lora_server.url + "/v1/refine",
        json={"prompt": "Explain gravity", "rounds": 1, "leader": {"source": "upstream", **GREEDY}},
        timeout=120,
    ).json()
    assert body["leader"]["source"] == "upstream"
    assert body["leader"]["text"] == direct.choices[0].message.content


# -- the Responses API: client.responses.create ---------------------------------------------------
def test_responses_create_is_the_refined_answer(client: openai.OpenAI, name: str) -> None:
    body = refinement(rounds=2, return_trace=True, stop_when_unchanged=False)
    r = client.responses.create(
        model=name,
        input="Explain gravity",
        instructions="Answer briefly.",
        max_output_tokens=10,
        temperature=0.0,
        extra_body=body,
    )
    chat = client.chat.completions.create(
        model=name,
        messages=[{"role": "system", "content": "Answer briefly."}, *USER],
        max_tokens=10,
        temperature=0.0,
        extra_body=body,
    )
    trace = r.model_extra["refinement"]
    assert r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert r.output_text == trace["rounds"][-1]["text"] == chat.choices[0].message.content
    assert r.usage is not None and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert [x["round"] for x in r.usage.model_extra["by_round"]] == [0, 1, 2]
    leader = client.responses.create(
        model=name + ":leader", input=[{"role": "user", "content": "Explain gravity"}]
    )
    assert leader.output_text and leader.usage is not None
    assert leader.usage.model_extra["by_round"][-1]["round"] == 0


def test_responses_stream_sends_the_event_sequence(client: openai.OpenAI, name: str) -> None:
    kw = dict(model=name, input="Explain gravity", max_output_tokens=12, temperature=0.0)
    body = refinement(rounds=1, stop_when_unchanged=False)
    whole = client.responses.create(extra_body=body, **kw)  # type: ignore[call-overload]
    events = list(client.responses.create(stream=True, extra_body=body, **kw))  # type: ignore[call-overload]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] == {"completed": "response.completed"}.get(whole.status, "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1  # token by token, not one piece
    assert {d.model_extra["round"] for d in deltas} == {1}
    assert "".join(d.delta for d in deltas) == whole.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert (
        final.output_text == whole.output_text
        and final.usage.total_tokens == whole.usage.total_tokens
    )


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
            "input[0].type",
        ),
    ],
)
def test_responses_fields_it_cannot_honour_are_400s(
    client: openai.OpenAI, name: str, kwargs: dict, param: str
) -> None:
    args = {"model": name, "input": "Explain gravity", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**args)
    assert info.value.param == param or info.value.body["param"] == param  # type: ignore[index]


# -- structured outputs and logprobs --------------------------------------------------------------
class Reading(pydantic.BaseModel):
    """A schema whose every answer is short: the tiny random model fills it within its tokens."""

    ok: bool
    level: int = pydantic.Field(ge=0, le=9)
    tag: str = pydantic.Field(max_length=3)


def test_parse_with_a_pydantic_model_gives_a_valid_answer(client: openai.OpenAI, name: str) -> None:
    for rounds in (0, 2):
        r = client.chat.completions.parse(
            model=name,
            messages=USER,
            response_format=Reading,
            max_tokens=120,
            seed=rounds,
            extra_body=refinement(rounds=rounds, return_trace=True, stop_when_unchanged=False),
        )
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Reading), r.choices[0].message.content
        trace = r.choices[0].model_extra["refinement"]
        steps = [trace["leader"], *trace["rounds"]]
        assert [s.get("output_format") for s in steps] == (
            ["json_schema"] if rounds == 0 else [None, "json_schema", "json_schema"]
        )
        for s in steps[1:] if rounds else steps:  # every constrained round satisfies the schema
            Reading.model_validate_json(s["text"])


def trace_of(choice: object) -> dict:
    return choice.model_extra["refinement"]  # type: ignore[attr-defined]


def test_json_object_and_logprobs_through_the_sdk(client: openai.OpenAI, name: str) -> None:
    r = client.chat.completions.create(
        model=name,
        messages=USER,
        max_tokens=40,
        logprobs=True,
        top_logprobs=3,
        seed=1,
        extra_body=refinement(rounds=1, return_trace=True, stop_when_unchanged=False),
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    # a character split over tokens shows as U+FFFD in each token's own text
    joined = "".join(t.token for t in tokens).replace("\ufffd", "")
    assert joined == (choice.message.content or "").replace("\ufffd", "")
    final = trace_of(choice)["rounds"][-1]
    assert len(tokens) in (
        final["usage"]["completion_tokens"],
        final["usage"]["completion_tokens"] - 1,
    )
    assert all(t.logprob <= 0 and 1 <= len(t.top_logprobs) <= 3 for t in tokens)
    trace = trace_of(choice)
    assert trace["rounds"][-1]["logprobs"] == [t.model_dump() for t in tokens]
    assert trace["leader"]["logprobs"]  # every round carries its own
    stream = client.chat.completions.create(
        model=name, messages=USER, max_tokens=12, logprobs=True, seed=1, stream=True
    )
    streamed = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].delta.content]
    assert streamed and all(lp is not None and lp.content for lp in streamed)
    obj = client.chat.completions.create(
        model=name + ":leader",
        messages=USER,
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_completions_legacy_logprobs_and_response_format_through_the_sdk(
    client: openai.OpenAI, name: str
) -> None:
    opts = refinement(rounds=1, return_trace=True, stop_when_unchanged=False)
    r = client.completions.create(
        model=name, prompt="Explain gravity", max_tokens=24, logprobs=2, seed=1, extra_body=opts
    )
    choice = r.choices[0]
    lp = choice.logprobs  # openai.types.completion_choice.Logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    joined = "".join(lp.tokens)
    assert joined.replace("\ufffd", "") == choice.text.replace("\ufffd", "")
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and token in top and 1 <= len(top) <= 3  # 2 and the sampled one
    final = trace_of(choice)["rounds"][-1]  # the answer's tokens are the final round's
    assert [t["token"] for t in final["logprobs"]] == lp.tokens
    stream = client.completions.create(
        model=name, prompt="Explain gravity", max_tokens=12, logprobs=1, seed=1, stream=True
    )
    pieces = [c.choices[0] for c in stream if c.choices and c.choices[0].text]
    assert pieces and all(p.logprobs is not None and p.logprobs.tokens for p in pieces)
    schema = {"name": "Reading", "schema": Reading.model_json_schema()}
    for rounds in (0, 1):
        r = client.completions.create(
            model=name,
            prompt="Explain gravity",
            max_tokens=120,
            seed=rounds,
            extra_body={
                "response_format": {"type": "json_schema", "json_schema": schema},
                **refinement(rounds=rounds, return_trace=True, stop_when_unchanged=False),
            },
        )
        Reading.model_validate_json(r.choices[0].text)
        steps = [trace_of(r.choices[0])["leader"], *trace_of(r.choices[0])["rounds"]]
        assert steps[-1]["output_format"] == "json_schema"


def test_responses_parse_with_a_pydantic_model(client: openai.OpenAI, name: str) -> None:
    r = client.responses.parse(
        model=name,
        input="Explain gravity",
        text_format=Reading,
        max_output_tokens=120,
        include=["message.output_text.logprobs"],
        extra_body=refinement(rounds=1, return_trace=True, stop_when_unchanged=False),
    )
    assert isinstance(r.output_parsed, Reading), r.output_text
    part = r.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs and r.model_extra["refinement"]["rounds"][0]["output_format"]


@pytest.mark.parametrize(
    "schema",
    [
        {"type": 5},
        {"type": "object", "properties": "x"},
        {"$ref": "#/$defs/missing"},
        {"type": "string", "pattern": "["},
        {"type": "string", "pattern": "(a+)+b"},
        {"enum": []},
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(400)}},
        {"anyOf": []},
        {"type": "integer", "minimum": 5, "maximum": 1},
    ],
)
def test_hostile_schemas_get_an_answer_or_a_400_and_the_engine_lives(
    shared_server: ServerProcess, name: str, schema: dict
) -> None:
    r = httpx.post(
        shared_server.url + "/v1/chat/completions",
        json={
            "model": name + ":leader",
            "messages": USER,
            "max_tokens": 8,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": schema},
            },
        },
        timeout=120,
    )
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"]
    assert httpx.get(shared_server.url + "/health", timeout=30).status_code == 200


def test_logit_bias_forces_a_token_and_an_unknown_one_is_a_400(
    client: openai.OpenAI, name: str
) -> None:
    r = client.chat.completions.create(
        model=name,
        messages=USER,
        max_tokens=6,
        logprobs=True,
        logit_bias={"100": 100},
        extra_body=refinement(rounds=1, stop_when_unchanged=False, return_trace=True),
    )
    for step in [
        r.choices[0].model_extra["refinement"]["leader"],
        *r.choices[0].model_extra["refinement"]["rounds"],
    ]:
        assert len({t["token"] for t in step["logprobs"]}) == 1, step["logprobs"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=name, messages=USER, max_tokens=4, logit_bias={"99999999": 5}
        )
    assert "logit_bias" in str(info.value)
