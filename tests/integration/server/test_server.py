"""End-to-end: the real ``slhf serve`` process, a real vLLM CPU engine, over HTTP on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import REPO, ServerProcess, server_env

pytestmark = pytest.mark.integration

GREEDY = {"temperature": 0.0, "max_tokens": 12}
# Short enough that an engine with enable_lora=True and one without agree on the base model's
# greedy tokens (bf16 near-ties make them drift apart after ~14 tokens).
SHORT_GREEDY = {"temperature": 0.0, "max_tokens": 6}


def refine(server: ServerProcess, **body: object) -> httpx.Response:
    return httpx.post(server.url + "/v1/refine", json=body, timeout=120)


def ok(server: ServerProcess, **body: object) -> dict:
    r = refine(server, **body)
    assert r.status_code == 200, r.text
    return r.json()


# -- topology (a): the default model, as `make serve` serves it --------------------------------
def test_random_model_is_built_locally_and_refines_two_rounds(
    shared_server: ServerProcess, cache_dir: Path
) -> None:
    assert any(p.name.startswith("tiny-llama") for p in cache_dir.iterdir())
    body = ok(shared_server, prompt="Explain gravity", rounds=2)
    assert body["object"] == "refinement" and body["leader"]["source"] == "leader"
    assert [r["round"] for r in body["rounds"]] in ([1, 2], [1])  # [1] only if it stopped early
    assert body["stopped_reason"] in ("max_rounds", "unchanged")
    assert body["final"] == (body["rounds"][-1]["text"])
    steps = [body["leader"], *body["rounds"]]
    assert all(s["usage"]["completion_tokens"] >= 1 for s in steps)
    assert all(s["finish_reason"] in ("stop", "length") for s in steps)
    # the Follower prompt holds the prompt, the answer and the instruction: longer than the Leader's
    assert body["rounds"][0]["usage"]["prompt_tokens"] > body["leader"]["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in steps)


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_round_count_is_honoured(shared_server: ServerProcess, rounds: int) -> None:
    body = ok(shared_server, prompt="Name a color", rounds=rounds, stop_when_unchanged=False)
    assert len(body["rounds"]) == rounds and body["stopped_reason"] == "max_rounds"


def test_seeded_requests_are_reproducible(shared_server: ServerProcess) -> None:
    req = {"prompt": "Tell me about the sea", "rounds": 2, "seed": 7, "stop_when_unchanged": False}
    a, b = ok(shared_server, **req), ok(shared_server, **req)
    texts = lambda r: [r["leader"]["text"], *(x["text"] for x in r["rounds"])]  # noqa: E731
    assert texts(a) == texts(b)
    c = ok(shared_server, **{**req, "seed": 8})
    assert texts(c) != texts(a)


def test_given_response_is_refined_by_the_follower(shared_server: ServerProcess) -> None:
    body = ok(
        shared_server, prompt="What is 2+2?", response="It is four.", rounds=1, follower=GREEDY
    )
    assert body["leader"]["source"] == "given" and body["leader"]["text"] == "It is four."
    assert body["leader"]["usage"]["total_tokens"] == 0
    assert len(body["rounds"]) == 1


def test_messages_and_leader_only_model_id(shared_server: ServerProcess) -> None:
    name = httpx.get(shared_server.url + "/v1/models").json()["data"][0]["id"]
    body = ok(
        shared_server,
        model=f"{name}:leader",
        messages=[{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hello"}],
    )
    assert body["rounds"] == [] and body["final"] == body["leader"]["text"]


def test_concurrent_requests_all_succeed(shared_server: ServerProcess) -> None:
    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=shared_server.url, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post("/v1/refine", json={"prompt": f"Question {i}", "rounds": 2})
                    for i in range(24)
                )
            )

    responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * 24


def test_models_health_ready(shared_server: ServerProcess) -> None:
    data = httpx.get(shared_server.url + "/v1/models").json()["data"]
    assert (
        data[0]["id"].startswith("slhf-tiny-llama") and data[1]["id"] == data[0]["id"] + ":leader"
    )
    assert data[0]["max_model_len"] == 512 and data[0]["slhf"]["topology"] == "shared"
    # lean by default: no manifest and no path of the serving machine; the rest with verbose
    lean = httpx.get(shared_server.url + "/v1/models").text
    verbose = httpx.get(shared_server.url + "/v1/models", params={"verbose": "true"}).json()
    source = verbose["data"][0]["slhf"]["source"]
    assert source.startswith("/") and source not in lean and "manifest" not in data[0]["slhf"]
    assert verbose["data"][0]["slhf"]["manifest"]["format_version"]
    assert httpx.get(shared_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(shared_server.url + "/ready").status_code == 200


# -- errors: always the envelope, never a 500 ---------------------------------------------------
@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"prompt": "x", "rounds": 5}, 400, "between 0 and 4"),
        ({"prompt": "x", "rounds": -1}, 400, "got -1"),
        ({"rounds": 1}, 400, "exactly one of"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "exactly one of"),
        ({"prompt": ""}, 400, "must not be empty"),
        ({"prompt": "x", "model": "nope"}, 404, "`nope` does not exist"),
        ({"prompt": "word " * 2000}, 400, "max_model_len is 512"),
        ({"prompt": "x", "response": "word " * 2000, "rounds": 1}, 400, "max_model_len is 512"),
    ],
)
def test_bad_input_gets_a_4xx_envelope(
    shared_server: ServerProcess, body: dict, status: int, fragment: str
) -> None:
    r = refine(shared_server, **body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_malformed_json_gets_a_400(shared_server: ServerProcess) -> None:
    r = httpx.post(
        shared_server.url + "/v1/refine",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "Malformed JSON" in r.json()["error"]["message"]


# -- topology (b): base + LoRA adapters in one engine --------------------------------------------
def test_lora_topology_uses_the_role_adapters(
    lora_server: ServerProcess, shared_server: ServerProcess, lora_model: Path, cache_dir: Path
) -> None:
    default = next(p for p in cache_dir.iterdir() if p.name.startswith("tiny-llama"))
    base_a, base_b = (
        load_file(str(lora_model / "model.safetensors")),
        load_file(str(default / "model.safetensors")),
    )
    assert base_a.keys() == base_b.keys() and all(torch.equal(base_a[k], base_b[k]) for k in base_a)

    cards = httpx.get(lora_server.url + "/v1/models").json()["data"]
    assert cards[0]["slhf"]["topology"] == "lora"
    req = {
        "prompt": "Describe a tree",
        "rounds": 1,
        "leader": SHORT_GREEDY,
        "follower": SHORT_GREEDY,
        "stop_when_unchanged": False,
    }
    with_adapters, base_only = ok(lora_server, **req), ok(shared_server, **req)
    # same base weights, same prompts, greedy: only the adapters can make these differ
    assert with_adapters["leader"]["text"] != base_only["leader"]["text"]
    given = {**req, "response": "Trees are tall plants."}
    assert ok(lora_server, **given)["final"] != ok(shared_server, **given)["final"]


def test_lora_topology_is_deterministic_under_greedy(lora_server: ServerProcess) -> None:
    req = {
        "prompt": "Describe a lake",
        "rounds": 2,
        "leader": GREEDY,
        "follower": GREEDY,
        "stop_when_unchanged": False,
    }
    a, b = ok(lora_server, **req), ok(lora_server, **req)
    assert a["final"] == b["final"] and a["leader"]["text"] == b["leader"]["text"]


# -- topology (c): two models of two families, two engines ---------------------------------------
def test_separate_topology_serves_two_families(separate_server: ServerProcess) -> None:
    cards = httpx.get(separate_server.url + "/v1/models").json()["data"]
    assert cards[0]["id"] == "pair" and cards[0]["slhf"]["topology"] == "separate"
    body = ok(separate_server, prompt="Explain rain", rounds=2, stop_when_unchanged=False)
    assert len(body["rounds"]) == 2 and body["leader"]["usage"]["completion_tokens"] >= 1


# -- start-up failures are clear and fast ---------------------------------------------------------
@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"SLHF_MODEL": "/nonexistent/model"}, "no such model folder"),
        ({"SLHF_MAX_ROUNDS": "-3"}, "max_rounds"),
    ],
)
def test_bad_settings_fail_at_start_with_the_reason(
    tmp_path: Path, settings: dict, fragment: str
) -> None:
    env = server_env(SLHF_PORT="0", SLHF_CACHE_DIR=str(tmp_path), **settings)
    proc = subprocess.run(
        [sys.executable, "-m", "slhf.cli", "serve"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert fragment in proc.stdout + proc.stderr
