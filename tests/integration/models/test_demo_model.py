"""The shipped demo model, served exactly as ``make serve`` serves it (no SLHF_MODEL)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from slhf_models.tasks.condorcet import check, sample_prompts
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration


def test_make_serve_default_is_the_trained_demo_model(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    server = ServerProcess.start(tmp_path / "demo.log", SLHF_CACHE_DIR=str(cache))
    try:
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "slhf-condorcet-tiny"
        for prompt in sample_prompts(3, "test", seed=7):
            r = httpx.post(
                server.url + "/v1/refine",
                json={"prompt": prompt, "rounds": 2, "stop_when_unchanged": False, "seed": 0},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            body = r.json()
            steps = [body["leader"], *body["rounds"]]
            assert len(body["rounds"]) == 2
            # a trained model: answers that end (EOS) within 64 tokens, each in one of the
            # task's three styles (the checker reads it)
            assert all(s["finish_reason"] == "stop" for s in steps), steps
            assert all(s["usage"]["completion_tokens"] <= 64 for s in steps)
            assert all(check(prompt, s["text"]).style in ("A", "B", "C") for s in steps), steps
    finally:
        server.stop()
    assert not cache.exists() or not any(cache.iterdir()), "no random model may be built"
