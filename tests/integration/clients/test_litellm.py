"""The LiteLLM example config, run for real: LiteLLM's Router in front of our server."""

from __future__ import annotations

from pathlib import Path

import litellm  # a dev dependency: a missing install must fail, not skip
import pytest
import yaml

from tests.integration.conftest import ServerProcess

CONFIG = Path(__file__).resolve().parents[3] / "clients" / "examples" / "litellm_config.yaml"


def test_litellm_config_routes_to_the_service(
    shared_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLHF_BASE_URL_V1", shared_server.url + "/v1")
    monkeypatch.setenv("SLHF_API_KEY", "unused")
    # the example names the shipped demo model; this server runs the random tiny one
    config = CONFIG.read_text().replace("slhf-condorcet-tiny", "slhf-tiny-llama")
    router = litellm.Router(model_list=yaml.safe_load(config)["model_list"])
    messages = [{"role": "user", "content": "Explain gravity"}]

    refined = router.completion(model="slhf-2-rounds", messages=messages, max_tokens=8, seed=3)
    assert isinstance(refined.choices[0].message.content, str)
    # where LiteLLM puts our `choices[i].refinement` (README, "OpenAI-compatible API")
    trace = refined.choices[0].provider_specific_fields["refinement"]
    assert [r["round"] for r in trace["rounds"]] == [1, 2]
    assert trace["rounds"][-1]["text"] == refined.choices[0].message.content

    leader = router.completion(model="slhf-leader", messages=messages, max_tokens=8, seed=3)
    assert isinstance(leader.choices[0].message.content, str)
    assert 1 <= leader.usage.completion_tokens <= 8  # one generation: no refinement rounds
    # same seed, so the same Leader answer; the refined request adds >= 1 Follower round on top
    assert refined.usage.completion_tokens > leader.usage.completion_tokens
