"""``LLMJudgePreference`` against our own server on loopback (``shared_server``).

The judge runs both ways: with ``logprobs=False`` the reply's first letter decides (A → 1, B → 0,
anything else → 0.5; the tiny model's text is gibberish, so mostly 0.5); with ``logprobs=True``
the first token's top log-probabilities of A and B do. What this pins down: the judge's request
is one our server accepts (200s, not a silent 0.5 from errors) and every value is a probability;
an unreachable URL gives 0.5.
"""

from __future__ import annotations

import httpx
import pytest

from slhf_models.preferences import LLMJudgePreference, unscored
from tests.integration.conftest import ServerProcess, free_port

PROMPTS = ["What is the map?", [{"role": "user", "content": "Why does it rain?"}], "Name a tree."]


@pytest.mark.parametrize("logprobs", [False, True])
def test_llm_judge_over_our_chat_completions_returns_probabilities(
    shared_server: ServerProcess, logprobs: bool
) -> None:
    model = httpx.get(shared_server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    statuses: list[int] = []
    client = httpx.Client(
        timeout=60, event_hooks={"response": [lambda r: statuses.append(r.status_code)]}
    )
    judge = LLMJudgePreference(
        shared_server.url + "/v1", f"{model}:leader", logprobs=logprobs, client=client, timeout_s=60
    )
    p = judge(
        PROMPTS, ["A map shows places.", "Clouds.", "Oak."], ["It is paper.", "Water.", "A fir."]
    )
    assert len(p) == 3 and all(0.0 <= v <= 1.0 for v in p)
    assert statuses == [200, 200, 200]


def test_llm_judge_on_an_unreachable_url_is_a_draw() -> None:
    judge = LLMJudgePreference(f"http://127.0.0.1:{free_port()}/v1", "judge", timeout_s=2)
    p = judge(["x", "y"], ["a", "b"], ["c", "d"])
    assert p == [0.5, 0.5] and len(unscored(p)) == 2  # draws, counted as failures
