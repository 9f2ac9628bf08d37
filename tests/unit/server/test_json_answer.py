"""Non-streamed answers are built and serialized off the event loop
(``slhf_server.json_answer``), and are the same JSON as the wire models'."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from slhf_server import json_answer
from slhf_server.protocol import RefineResponse
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_hardening import make_app


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/refine", {"prompt": "Why?", "rounds": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Why?"}], "n": 2}),
        ("/v1/completions", {"prompt": ["a?", "b?"]}),
        ("/v1/responses", {"input": "Why?"}),
    ],
)
def test_answers_are_built_in_a_worker_thread(
    path: str, body: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    on_loop: list[bool] = []
    render = json_answer._render

    def spy(build: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no event loop runs in this thread
            on_loop.append(False)
        return render(build)

    monkeypatch.setattr(json_answer, "_render", spy)
    with TestClient(make_app(ScriptedEngine(numbered_script))) as client:
        r = client.post(path, json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert on_loop == [False]
    key = {"/v1/refine": "final", "/v1/responses": "output"}.get(path, "choices")
    assert r.json()[key]


def test_the_answer_is_the_models_json() -> None:
    with TestClient(make_app(ScriptedEngine(numbered_script))) as client:
        r = client.post("/v1/refine", json={"prompt": "Why?", "rounds": 2})
    model = RefineResponse.model_validate_json(r.content)
    assert isinstance(model, BaseModel) and model.model_dump(mode="json") == r.json()
    assert r.json()["final"] == "answer 2" and len(r.json()["rounds"]) == 2
