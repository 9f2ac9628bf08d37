"""The OpenAI-compatible routes with a fake engine: shapes, streaming, n, errors, upstream."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from slhf_server.app import create_app
from slhf_server.settings import ServerSettings
from slhf_server.upstream import UpstreamClient
from tests.fakes import Call, ScriptedEngine, numbered_script
from tests.unit.server.test_routes import WEIGHTS, assert_envelope

MODEL = "fake-slhf"
USER = [{"role": "user", "content": "Explain gravity"}]


def seeded_script(call: Call) -> str:
    """Text that depends on the round and the seed, so seeds are visible in answers."""
    index = call.request_id.rsplit("-", 1)[1]
    return f"answer {index} seed {call.params.seed}"


def make_client(engine: ScriptedEngine, **settings: object) -> TestClient:
    app = create_app(
        ServerSettings(max_rounds=4, **settings),  # type: ignore[arg-type]
        weights=WEIGHTS,
        engine_factory=lambda w, s: engine,
    )
    return TestClient(app)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[TestClient]:
    with make_client(engine) as c:
        yield c


def chat(client: TestClient, **body: object) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})


def sse_events(resp: httpx.Response) -> list[dict | str]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    out: list[dict | str] = []
    for line in resp.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def content_by_round(events: list[dict | str], index: int = 0) -> dict[int, str]:
    texts: dict[int, str] = {}
    for ev in events:
        for c in ev["choices"] if isinstance(ev, dict) and "choices" in ev else []:
            if c["index"] == index and c["delta"].get("content") and "round" in c:
                texts[c["round"]] = texts.get(c["round"], "") + c["delta"]["content"]
    return texts


# -- non-streamed ---------------------------------------------------------------------------------
def test_chat_answer_is_the_final_round_with_trace_and_usage_breakdown(
    client: TestClient,
) -> None:
    body = chat(client, refinement={"rounds": 2, "return_trace": True}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "answer 2"}
    assert choice["finish_reason"] == "stop"
    trace = choice["refinement"]
    assert trace["leader"]["text"] == "answer 0" and trace["leader"]["source"] == "leader"
    assert [r["text"] for r in trace["rounds"]] == ["answer 1", "answer 2"]
    usage = body["usage"]
    assert usage["completion_tokens"] == 6  # 2 words x (leader + 2 rounds)
    assert usage["by_role"]["leader"]["completion_tokens"] == 2
    assert usage["by_role"]["follower"]["completion_tokens"] == 4
    assert [r["round"] for r in usage["by_round"]] == [0, 1, 2]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_model_ids_pick_the_default_rounds_or_leader_only(
    client: TestClient, engine: ScriptedEngine
) -> None:
    assert chat(client).json()["choices"][0]["message"]["content"] == "answer 2"  # manifest: 2
    body = chat(client, model=f"{MODEL}:leader").json()
    assert body["choices"][0]["message"]["content"] == "answer 0"
    assert "refinement" not in body["choices"][0] or body["choices"][0]["refinement"] is None


def test_standard_fields_reach_every_generation(client: TestClient, engine: ScriptedEngine) -> None:
    chat(client, max_tokens=5, temperature=0.3, top_p=0.5, stop=["END"], seed=3)
    assert len(engine.calls) == 3
    for call in engine.calls:
        p = call.params
        assert (p.max_tokens, p.temperature, p.top_p, p.stop) == (5, 0.3, 0.5, ("END",))
    assert engine.calls[0].params.seed != engine.calls[1].params.seed  # derived per round
    engine.calls.clear()
    chat(client, max_completion_tokens=4, max_tokens=9)
    assert all(c.params.max_tokens == 4 for c in engine.calls)


def test_n_choices_differ_and_repeat_with_the_same_seed() -> None:
    engine = ScriptedEngine(seeded_script, context=512)
    with make_client(engine) as client:
        a = chat(client, n=3, seed=11, refinement={"rounds": 1}).json()
        b = chat(client, n=3, seed=11, refinement={"rounds": 1}).json()
        one = chat(client, n=1, seed=11, refinement={"rounds": 1}).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert texts == [c["message"]["content"] for c in b["choices"]]
    assert one["choices"][0]["message"]["content"] == texts[0]
    assert a["usage"]["completion_tokens"] == 3 * 2 * 4  # 3 choices x 2 generations x 4 words


def test_n_choices_run_concurrently() -> None:
    engine = ScriptedEngine(numbered_script, context=512, delay=0.05)
    with make_client(engine) as client:
        chat(client, n=4, refinement={"rounds": 1})
    assert engine.peak_running == 4


def test_given_response_skips_the_leader(client: TestClient, engine: ScriptedEngine) -> None:
    body = chat(
        client, refinement={"rounds": 1, "response": "It falls.", "return_trace": True}
    ).json()
    trace = body["choices"][0]["refinement"]
    assert trace["leader"] == {**trace["leader"], "source": "given", "text": "It falls."}
    assert [c.role for c in engine.calls] == ["follower"]


def test_developer_messages_and_text_parts_are_accepted(
    client: TestClient, engine: ScriptedEngine
) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}],
        },
    ]
    assert chat(client, messages=messages).status_code == 200
    assert engine.calls[0].prompt == "<|system|>Be brief.\n<|user|>Hi you\n<|assistant|>"


def test_completions_endpoint_with_a_prompt_batch(client: TestClient) -> None:
    body = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2}
    ).json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "answer 2" for c in body["choices"])


# -- streaming ------------------------------------------------------------------------------------
def test_stream_sends_the_final_round_in_openai_chunks(client: TestClient) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": USER,
            "stream": True,
            "stream_options": {"include_usage": True},
            "refinement": {"rounds": 2, "stop_when_unchanged": False},
        },
    ) as resp:
        resp.read()
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content_by_round(events) == {2: "answer 2"}  # only the final round streams
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"]]) >= 3
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_stream_rounds_streams_every_round_marked_with_its_number(client: TestClient) -> None:
    resp = chat(client, stream=True, refinement={"rounds": 2, "stream_rounds": True})
    events = sse_events(resp)
    assert content_by_round(events) == {0: "answer 0", 1: "answer 1", 2: "answer 2"}
    assert all("usage" not in e for e in events if isinstance(e, dict))


def test_stream_after_an_early_stop_sends_the_final_answer() -> None:
    engine = ScriptedEngine(lambda call: "same text", context=512)
    with make_client(engine) as client:
        events = sse_events(chat(client, stream=True, refinement={"rounds": 3}))
    assert content_by_round(events) == {1: "same text"}  # round 1 was unchanged: final


def test_stream_n2_interleaves_choices(client: TestClient) -> None:
    events = sse_events(chat(client, stream=True, n=2))
    assert content_by_round(events, 0) == content_by_round(events, 1) == {2: "answer 2"}


def test_completions_stream(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    events = sse_events(resp)
    chunks = [e for e in events if isinstance(e, dict)]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "answer 2"


def test_a_failure_mid_stream_sends_one_error_event_then_done() -> None:
    engine = ScriptedEngine(lambda call: "one two three four", context=512, fail_stream_after=2)
    with make_client(engine) as client:
        events = sse_events(chat(client, stream=True, refinement={"rounds": 1}))
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "engine_error"
    assert events[-1] == "[DONE]" and events[-2] == errors[0]
    assert content_by_round(events) == {1: "one two"}


def test_a_failure_before_the_stream_starts_is_a_plain_error(client: TestClient) -> None:
    resp = chat(client, stream=True, refinement={"rounds": 9})
    assert_envelope(resp, 400, "between 0 and 4", param="refinement.rounds")


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, status, fragment, param",
    [
        ({"model": "nope"}, 404, "`nope` does not exist", "model"),
        ({"refinement": {"rounds": 5}}, 400, "between 0 and 4 (SLHF_MAX_ROUNDS); got 5", None),
        ({"tools": [{"type": "function"}]}, 400, "`tools` is not supported", "tools"),
        ({"top_logprobs": 2}, 400, "`top_logprobs` needs `logprobs`", "top_logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, 400, "top_logprobs:", "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, 400, "`json_schema` is required", None),
        ({"response_format": {"type": "xml"}}, 400, "response_format.type", None),
        ({"logit_bias": {"x": 1}}, 400, "token ids", "logit_bias"),
        ({"logit_bias": {"5": 101}}, 400, "between -100 and 100", "logit_bias"),
        ({"presence_penalty": 2.5}, 400, "presence_penalty:", "presence_penalty"),
        ({"min_p": 1.5}, 400, "min_p:", "min_p"),
        ({"repetition_penalty": 0}, 400, "repetition_penalty:", "repetition_penalty"),
        ({"top_k": 0}, 400, "top_k must be -1", "top_k"),
        ({"ignore_eos": "yes"}, 400, "ignore_eos:", "ignore_eos"),
        ({"min_tokens": 9, "max_tokens": 4}, 400, "more than its max_tokens", "min_tokens"),
        ({"stream_options": {"include_usage": True}}, 400, "only allowed when `stream`", None),
        ({"n": 0}, 400, "n:", "n"),
        ({"temperature": 3}, 400, "temperature", None),
        ({"bogus": 1}, 400, "Extra inputs are not permitted", "bogus"),
        ({"refinement": {"round": 1}}, 400, "refinement.round", None),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message", None),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "tool", None),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "only 'text' content parts",
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "w" * 600}]}, 400, "max_model_len is 512", None),
        ({"model": f"{MODEL}@upstream"}, 400, "SLHF_UPSTREAM_BASE_URL", "model"),
    ],
)
def test_bad_input_gets_the_envelope(
    client: TestClient, body: dict, status: int, fragment: str, param: str | None
) -> None:
    assert_envelope(chat(client, **body), status, fragment, param=param)


def test_completions_rejects_echo_and_missing_prompt(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True})
    assert_envelope(r, 400, "`echo` is not supported", param="echo")
    assert_envelope(client.post("/v1/completions", json={"model": MODEL}), 400, "prompt")


# -- upstream -------------------------------------------------------------------------------------
def upstream_client(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> list[dict]:
    seen: list[dict] = []

    def wrapped(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return handler(request)

    def from_settings(settings: ServerSettings) -> UpstreamClient:
        return UpstreamClient(
            "http://up/v1", "other", timeout_s=0.5, transport=httpx.MockTransport(wrapped)
        )

    monkeypatch.setattr(UpstreamClient, "from_settings", staticmethod(from_settings))
    return seen


def completion_json(text: str) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "choices": [
                {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        },
    )


def test_upstream_answer_is_refined_by_our_follower(
    monkeypatch: pytest.MonkeyPatch, engine: ScriptedEngine
) -> None:
    seen = upstream_client(monkeypatch, lambda r: completion_json("Upstream says hi"))
    with make_client(engine) as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert f"{MODEL}@upstream" in models
        body = chat(
            client, model=f"{MODEL}@upstream", refinement={"rounds": 1, "return_trace": True}
        ).json()
        refined = client.post(
            "/v1/refine", json={"prompt": "x", "rounds": 1, "leader": {"source": "upstream"}}
        ).json()
    trace = body["choices"][0]["refinement"]
    assert trace["leader"]["source"] == "upstream" and trace["leader"]["text"] == "Upstream says hi"
    assert body["choices"][0]["message"]["content"] == "answer 1"
    assert "Upstream says hi" in engine.calls[0].prompt and engine.calls[0].role == "follower"
    assert seen[0]["model"] == "other" and seen[0]["messages"] == USER
    assert refined["leader"]["source"] == "upstream"


@pytest.mark.parametrize(
    "handler, status, fragment",
    [
        (lambda r: httpx.Response(500, json={"error": {"message": "boom"}}), 502, "500: boom"),
        (lambda r: httpx.Response(200, text="not json"), 502, "not a chat completion"),
        (lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused")), 502, "refused"),
        (lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow")), 504, "within 0.5 s"),
    ],
)
def test_upstream_failures_are_502_or_504(
    monkeypatch: pytest.MonkeyPatch,
    engine: ScriptedEngine,
    handler: Callable[[httpx.Request], httpx.Response],
    status: int,
    fragment: str,
) -> None:
    upstream_client(monkeypatch, handler)
    with make_client(engine) as client:
        assert_envelope(chat(client, model=f"{MODEL}@upstream"), status, fragment)
        # streamed: the upstream answer is awaited before the response starts
        assert_envelope(chat(client, model=f"{MODEL}@upstream", stream=True), status, fragment)


def test_upstream_settings_need_a_model() -> None:
    with pytest.raises(ValueError, match="SLHF_UPSTREAM_MODEL"):
        ServerSettings(upstream_base_url="http://up/v1")


def test_logprobs_are_the_final_rounds_tokens(client: TestClient) -> None:
    body = chat(
        client, logprobs=True, top_logprobs=1, refinement={"rounds": 2, "return_trace": True}
    ).json()
    choice = body["choices"][0]
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["answer", " 2"]
    assert choice["logprobs"]["content"][0] == {
        "token": "answer",
        "logprob": -0.5,
        "bytes": list(b"answer"),
        "top_logprobs": [{"token": "alt0", "logprob": -1.0, "bytes": list(b"alt0")}],
    }
    trace = choice["refinement"]
    assert trace["rounds"][-1]["logprobs"] == choice["logprobs"]["content"]
    assert [t["token"] for t in trace["leader"]["logprobs"]] == ["answer", " 0"]
    assert chat(client).json()["choices"][0]["logprobs"] is None


def test_streamed_chunks_carry_their_tokens_logprobs(client: TestClient) -> None:
    events = sse_events(chat(client, stream=True, logprobs=True, refinement={"rounds": 1}))
    content = [
        c["choices"][0]
        for c in events
        if isinstance(c, dict) and c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert [c["logprobs"]["content"][0]["token"] for c in content] == ["answer", " 1"]
    # an early stop sends the answer in one piece, with all its tokens
    engine = ScriptedEngine(lambda call: "same text", context=512)
    with make_client(engine) as other:
        events = sse_events(chat(other, stream=True, logprobs=True, refinement={"rounds": 3}))
    pieces = [
        c["choices"][0]
        for c in events
        if isinstance(c, dict) and c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert len(pieces) == 1 and [t["token"] for t in pieces[0]["logprobs"]["content"]] == [
        "same",
        " text",
    ]
