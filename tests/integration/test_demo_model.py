"""The shipped demo model, served exactly as ``make serve`` serves it (no SLHF_MODEL)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from models.tasks.arith import attribute_scores
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration


def test_make_serve_default_is_the_trained_demo_model(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    server = ServerProcess.start(tmp_path / "demo.log", SLHF_CACHE_DIR=str(cache))
    try:
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "slhf-arith-tiny"
        prompts = ["Add 17 and 25.", "What is 30 minus 8?", "Subtract 12 from 40."]
        for prompt in prompts:
            r = httpx.post(
                server.url + "/v1/refine",
                json={"prompt": prompt, "rounds": 2, "stop_when_unchanged": False},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            body = r.json()
            steps = [body["leader"], *body["rounds"]]
            assert len(body["rounds"]) == 2
            # a trained model: short answers that end (EOS), with a number, in the task's terms
            assert all(s["finish_reason"] == "stop" for s in steps), steps
            assert all(re.search(r"\d", s["text"]) for s in steps), steps
            assert all(s["usage"]["completion_tokens"] <= 48 for s in steps)
            attribute_scores(prompt, body["final"])  # parses as an answer to the prompt
    finally:
        server.stop()
    assert not cache.exists() or not any(cache.iterdir()), "no random model may be built"
