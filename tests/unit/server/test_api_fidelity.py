"""The API as docs/wire.md describes it, with a fake engine: the OpenAPI document as the server
behaves, vLLM's extra sampling fields per role, string error codes, a lean ``/v1/models``,
``slhf serve``'s flags, JSON-only logs (docs/deploy.md, "Logs"), and a client stream without
empty chunks."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from slhf import cli
from slhf_server.app import create_app
from slhf_server.log_pipe import as_json_line, split_lines
from slhf_server.logs import JsonFormatter
from slhf_server.openai_protocol import UNSUPPORTED
from slhf_server.plan import EXTRA_SAMPLING
from slhf_server.settings import ServerSettings
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_routes import WEIGHTS

MODEL = "fake-slhf"
USER = [{"role": "user", "content": "Explain gravity"}]


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(numbered_script, context=512)


def app_for(engine: ScriptedEngine, **settings: object):  # type: ignore[no-untyped-def]
    s = ServerSettings(max_rounds=4, **settings)  # type: ignore[arg-type]
    return create_app(s, weights=WEIGHTS, engine_factory=lambda w, s: engine)


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[TestClient]:
    with TestClient(app_for(engine)) as c:
        yield c


# -- /openapi.json --------------------------------------------------------------------------------
@pytest.fixture
def openapi(client: TestClient) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_openapi_has_no_422_and_no_validation_error_schema(openapi: dict) -> None:
    text = json.dumps(openapi)
    assert '"422"' not in text and "HTTPValidationError" not in text
    assert "ValidationError" not in openapi["components"]["schemas"]


@pytest.mark.parametrize(
    "path, model",
    [("/v1/chat/completions", "ChatCompletionResponse"), ("/v1/completions", "CompletionResponse")],
)
def test_openapi_types_the_200_and_the_error_envelope(openapi: dict, path: str, model: str) -> None:
    responses = openapi["paths"][path]["post"]["responses"]
    ok = responses["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    assert "text/event-stream" in ok
    for status in ("400", "401", "404", "429", "503"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/ErrorResponse"
    envelope = openapi["components"]["schemas"]["ErrorDetail"]["properties"]
    assert envelope["code"]["type"] == "string"


def test_openapi_describes_every_refinement_field(openapi: dict) -> None:
    schemas = openapi["components"]["schemas"]
    for name in ("RefinementOptions", "SamplingOptions", "LeaderSamplingOptions", "RefineRequest"):
        props = schemas[name]["properties"]
        missing = [field for field, p in props.items() if not p.get("description")]
        assert not missing, f"{name}: no description on {missing}"
    assert set(schemas["RefinementOptions"]["properties"]) >= {
        "rounds",
        "response",
        "stop_when_unchanged",
        "return_trace",
        "stream_rounds",
        "leader",
        "follower",
        "deadline_s",
    }


def test_openapi_marks_the_rejected_fields_as_rejected(openapi: dict) -> None:
    schemas = openapi["components"]["schemas"]
    props = {
        **schemas["ChatCompletionRequest"]["properties"],
        **schemas["CompletionRequest"]["properties"],
    }
    for name in UNSUPPORTED:
        assert props[name].get("x-slhf-unsupported") is True, name
        assert "rejected with a 400" in props[name]["description"]
    for name in EXTRA_SAMPLING:  # accepted, typed, bounded
        assert "x-slhf-unsupported" not in props[name] and props[name].get("description")


# -- vLLM's extra sampling fields ----------------------------------------------------------------
def test_extra_sampling_fields_apply_to_every_generation_and_per_role(
    client: TestClient, engine: ScriptedEngine
) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": USER,
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "min_tokens": 1,
            "ignore_eos": True,
            "refinement": {"rounds": 1, "follower": {"min_p": 0.3, "repetition_penalty": 1.0}},
        },
    )
    assert r.status_code == 200, r.text
    leader, follower = (c.params for c in engine.calls)
    assert (leader.top_k, leader.min_p, leader.repetition_penalty) == (5, 0.1, 1.2)
    assert (leader.presence_penalty, leader.frequency_penalty) == (0.5, -0.5)
    assert (leader.min_tokens, leader.ignore_eos) == (1, True)
    assert (follower.top_k, follower.min_p, follower.repetition_penalty) == (5, 0.3, 1.0)
    assert follower.ignore_eos is True


def test_refine_takes_the_extra_fields_per_role(client: TestClient, engine: ScriptedEngine) -> None:
    body = {"prompt": "x", "rounds": 1, "leader": {"min_p": 0.2}, "follower": {"ignore_eos": True}}
    assert client.post("/v1/refine", json=body).status_code == 200
    leader, follower = (c.params for c in engine.calls)
    assert (leader.min_p, leader.ignore_eos) == (0.2, False)
    assert (follower.min_p, follower.ignore_eos, follower.repetition_penalty) == (0.0, True, 1.0)


# -- error codes ---------------------------------------------------------------------------------
def test_every_error_code_is_a_string(engine: ScriptedEngine) -> None:
    with TestClient(app_for(engine, api_keys="k", max_body_bytes=2048)) as c:
        key = {"Authorization": "Bearer k"}
        answers = [
            c.post("/v1/chat/completions", json={"messages": USER}),  # 401
            c.post("/v1/chat/completions", headers=key, json={"messages": USER, "n": 0}),  # 400
            c.post("/v1/chat/completions", headers=key, content=b"{"),  # malformed
            c.post("/v1/refine", headers=key, json={"prompt": "x", "rounds": 9}),  # 400
            c.get("/v1/nope", headers=key),  # 404
            c.get("/v1/refine", headers=key),  # 405
            c.post("/v1/refine", headers=key, content=b"x" * 4096),  # 413
            c.get("/v1/models", headers=key, params={"verbose": "maybe"}),  # 400
        ]
    statuses = [r.status_code for r in answers]
    assert statuses == [401, 400, 400, 400, 404, 405, 413, 400]
    codes = [r.json()["error"]["code"] for r in answers]
    assert all(isinstance(code, str) and code for code in codes), codes


# -- /v1/models ----------------------------------------------------------------------------------
def test_models_gives_what_a_client_needs_and_no_local_paths(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert "/models/fake" not in r.text  # WEIGHTS' source: a local absolute path
    card = r.json()["data"][0]
    assert card["root"] == "fake"
    assert set(card["slhf"]) == {"topology", "rounds", "default_rounds", "max_rounds", "template"}
    assert card["slhf"]["template"]["follower_instruction"]
    assert len(r.content) < 2000


def test_models_verbose_adds_the_manifest_and_source(client: TestClient) -> None:
    card = client.get("/v1/models", params={"verbose": "true"}).json()["data"][0]
    assert card["slhf"]["source"] == "/models/fake"
    assert card["slhf"]["manifest"]["name"] == MODEL and card["slhf"]["manifest"]["leader"]


# -- slhf serve ----------------------------------------------------------------------------------
def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli._serve_parser(sub)
    return parser.parse_args(["serve", *argv])


def test_serve_takes_the_model_and_vllms_engine_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLHF_DTYPE", "float16")  # a flag wins over the environment
    args = _serve_args(
        "org/model",
        "--tensor-parallel-size",
        "2",
        "--gpu-memory-utilization",
        "0.9",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "8192",
        "--api-key",
        "secret",
    )
    settings = ServerSettings(**cli.serve_overrides(args))
    assert (settings.model, settings.tensor_parallel_size) == ("org/model", 2)
    assert (settings.gpu_memory_utilization, settings.dtype) == (0.9, "bfloat16")
    assert settings.max_model_len == 8192 and settings.api_key_list() == ["secret"]


def test_serve_model_flag_still_works_and_two_models_are_refused() -> None:
    assert cli.serve_overrides(_serve_args("--model", "a/b"))["model"] == "a/b"
    with pytest.raises(ValueError, match="two models"):
        cli.serve_overrides(_serve_args("x/y", "--model", "a/b"))


# -- logs ----------------------------------------------------------------------------------------
def test_json_log_lines_carry_no_color_message() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started", None, None)
    record.color_message = "\x1b[32mStarted\x1b[0m"
    line = json.loads(JsonFormatter().format(record))
    assert "color_message" not in line and line["message"] == "Started"


def test_plain_lines_on_stderr_become_json_objects() -> None:
    lines, rest = split_lines(b"[W1130 utils.cpp:68] Warning: NUMA\rLoading 0%\rLoading 100%\n\nha")
    assert lines == ["[W1130 utils.cpp:68] Warning: NUMA", "Loading 0%", "Loading 100%"]
    assert rest == b"ha"
    wrapped = json.loads(as_json_line(lines[0]))
    assert wrapped["level"] == "warning" and wrapped["logger"] == "stderr"
    assert wrapped["message"] == lines[0]
    already = '{"level": "info", "message": "hi"}'
    assert as_json_line(already) == already
