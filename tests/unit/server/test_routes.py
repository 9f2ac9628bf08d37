"""The HTTP surface with a fake engine: wire shape, defaults, and every error as an envelope."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from slhf_models.serving.loading import RoleWeights, ServedWeights
from slhf_models.serving.manifest import Manifest, RoleSpec, SamplingDefaults
from slhf_server.app import create_app
from slhf_server.settings import ServerSettings
from tests.fakes import ScriptedEngine, numbered_script

MANIFEST = Manifest(
    name="fake-slhf",
    leader=RoleSpec(sampling=SamplingDefaults(max_tokens=7, temperature=0.5, top_k=10)),
    follower=RoleSpec(sampling=SamplingDefaults(max_tokens=9, temperature=0.8, top_p=0.9)),
    default_rounds=2,
)
WEIGHTS = ServedWeights(
    name="fake-slhf",
    manifest=MANIFEST,
    topology="shared",
    leader=RoleWeights("/models/fake"),
    follower=RoleWeights("/models/fake"),
    source="/models/fake",
)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[TestClient]:
    app = create_app(
        ServerSettings(max_rounds=4), weights=WEIGHTS, engine_factory=lambda w, s: engine
    )
    with TestClient(app) as c:
        yield c


def assert_envelope(resp, status: int, *fragments: str, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for f in fragments:
        assert f in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_refine_returns_the_wire_contract(client: TestClient) -> None:
    body = client.post("/v1/refine", json={"prompt": "Explain gravity", "rounds": 2}).json()
    assert body["object"] == "refinement" and body["model"] == "fake-slhf"
    assert body["id"].startswith("refine-") and isinstance(body["created"], int)
    assert body["leader"]["text"] == "answer 0" and body["leader"]["source"] == "leader"
    assert body["leader"]["finish_reason"] == "stop"
    assert [r["round"] for r in body["rounds"]] == [1, 2]
    assert {"text", "finish_reason", "usage", "latency_ms"} <= set(body["rounds"][0])
    assert body["final"] == "answer 2" and body["stopped_reason"] == "max_rounds"
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0


def test_rounds_default_to_the_manifest_and_leader_model_means_no_rounds(
    client: TestClient,
) -> None:
    assert len(client.post("/v1/refine", json={"prompt": "x"}).json()["rounds"]) == 2
    body = client.post("/v1/refine", json={"prompt": "x", "model": "fake-slhf:leader"}).json()
    assert body["rounds"] == [] and body["final"] == "answer 0"


def test_sampling_defaults_come_from_the_manifest_per_role(
    client: TestClient, engine: ScriptedEngine
) -> None:
    client.post(
        "/v1/refine",
        json={"prompt": "x", "rounds": 1, "follower": {"temperature": 0.0, "stop": "END"}},
    )
    leader, follower = engine.calls
    assert (leader.params.max_tokens, leader.params.temperature, leader.params.top_k) == (
        7,
        0.5,
        10,
    )
    assert (follower.params.max_tokens, follower.params.temperature) == (9, 0.0)
    assert follower.params.top_p == 0.9 and follower.params.stop == ("END",)


def test_messages_are_accepted_as_the_prompt(client: TestClient, engine: ScriptedEngine) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/v1/refine", json={"messages": msgs, "rounds": 1})
    assert r.status_code == 200
    assert engine.calls[0].prompt.startswith("<|system|>Be brief.\n<|user|>Hi\n")


def test_given_response_is_refined(client: TestClient) -> None:
    body = client.post("/v1/refine", json={"prompt": "x", "response": "mine", "rounds": 1}).json()
    assert body["leader"] == {
        "text": "mine",
        "source": "given",
        "finish_reason": None,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "latency_ms": 0.0,
    }
    assert body["final"] == "answer 1"


@pytest.mark.parametrize("rounds", [-1, 5, 100])
def test_rounds_out_of_range_is_a_400_with_the_numbers(client: TestClient, rounds: int) -> None:
    r = client.post("/v1/refine", json={"prompt": "x", "rounds": rounds})
    assert_envelope(r, 400, "between 0 and 4", f"got {rounds}", param="rounds")


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"rounds": 1}, "exactly one of `prompt` or `messages`"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of"),
        ({"prompt": "   "}, "`prompt` must not be empty"),
        ({"messages": []}, "at least one message"),
        (
            {"messages": [{"role": "assistant", "content": "y"}]},
            "last message must have role 'user'",
        ),
        ({"messages": [{"role": "robot", "content": "y"}]}, "messages.0.role"),
        ({"prompt": "x", "response": ""}, "`response` must not be empty"),
        ({"prompt": "x", "round": 2}, "round: Extra inputs are not permitted"),
        ({"prompt": "x", "leader": {"temperature": -1}}, "leader.temperature"),
        ({"prompt": "x", "follower": {"top_k": 0}}, "top_k must be -1"),
        ({"prompt": "x", "rounds": "two"}, "rounds"),
    ],
)
def test_bad_requests_are_400_envelopes(client: TestClient, payload: dict, fragment: str) -> None:
    assert_envelope(client.post("/v1/refine", json=payload), 400, fragment)


def test_malformed_json_is_a_400(client: TestClient) -> None:
    r = client.post(
        "/v1/refine", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert_envelope(r, 400, "Malformed JSON")


def test_body_that_is_not_an_object_is_a_400(client: TestClient) -> None:
    assert_envelope(client.post("/v1/refine", json=["x"]), 400)


def test_unknown_model_is_a_404(client: TestClient) -> None:
    r = client.post("/v1/refine", json={"prompt": "x", "model": "gpt-9"})
    err = assert_envelope(
        r, 404, "`gpt-9` does not exist", "fake-slhf, fake-slhf:leader", param="model"
    )
    assert err["code"] == "model_not_found"


def test_prompt_longer_than_the_context_is_a_400(client: TestClient) -> None:
    r = client.post("/v1/refine", json={"prompt": "y" * 600, "rounds": 0})
    err = assert_envelope(r, 400, "max_model_len is 512", "tokens", param="prompt")
    assert err["code"] == "context_length_exceeded"


def test_unknown_route_and_wrong_method_are_envelopes(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nothing"), 404)
    assert_envelope(client.get("/v1/refine"), 405)


def test_models_lists_refined_and_leader_ids(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["fake-slhf", "fake-slhf:leader"]
    assert data[0]["max_model_len"] == 512 and data[0]["owned_by"] == "slhf"
    assert data[0]["slhf"]["topology"] == "shared" and data[0]["slhf"]["rounds"] == 2
    assert data[1]["slhf"]["rounds"] == 0 and data[1]["parent"] == "fake-slhf"


def test_health_and_ready(client: TestClient, engine: ScriptedEngine) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    engine.dead = True
    assert_envelope(client.get("/ready"), 503, "dead")
    assert_envelope(client.get("/health"), 503)
    assert_envelope(client.post("/v1/refine", json={"prompt": "x"}), 503, "dead")
