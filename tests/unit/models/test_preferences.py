"""Preference functions: callable, Bradley–Terry reward model, multi-attribute vote, LLM judge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from slhf_models.preferences import (
    CallablePreference,
    LLMJudgePreference,
    MultiAttributeVote,
    PreferenceError,
    RewardModelPreference,
    RewardModelScorer,
    Unscored,
    unscored,
)


class LengthScorer:
    """Score = answer length (a fake reward model)."""

    def scores(self, prompts, answers):  # type: ignore[no-untyped-def]
        return [float(len(a)) for a in answers]


class TableScorer:
    """Score = a fixed reward per answer text."""

    def __init__(self, rewards: dict[str, float]) -> None:
        self.rewards = rewards

    def scores(self, prompts, answers):  # type: ignore[no-untyped-def]
        return [self.rewards[a] for a in answers]


class FirstCharScorer:
    def scores(self, prompts, answers):  # type: ignore[no-untyped-def]
        return [float(ord(a[0])) for a in answers]


def test_callable_preference_is_batched_and_checks_the_range() -> None:
    pref = CallablePreference(lambda x, a, b: 1.0 if len(a) > len(b) else 0.0)
    assert pref(["x", "y"], ["long", "a"], ["a", "long"]) == [1.0, 0.0]

    def broken(x: str, a: str, b: str) -> float:
        return 1.5

    with pytest.raises(PreferenceError, match=r"broken returned 1.5; a preference must be in"):
        CallablePreference(broken)(["x"], ["a"], ["b"])
    with pytest.raises(PreferenceError, match="same length; got 1, 2, 1"):
        pref(["x"], ["a", "b"], ["c"])


def test_reward_model_preference_is_sigmoid_of_the_score_difference() -> None:
    pref = RewardModelPreference(LengthScorer())
    p = pref(["x", "x"], ["abc", "a"], ["a", "a"])
    assert p[0] == pytest.approx(1 / (1 + math.exp(-2)))
    assert p[1] == pytest.approx(0.5)


def test_multi_attribute_vote_counts_attributes_and_inverts() -> None:
    # a="zz" is longer (wins length) and has the larger first char (wins first-char).
    vote = MultiAttributeVote([LengthScorer(), FirstCharScorer()])
    assert vote(["x"], ["zz"], ["a"]) == [1.0]
    inverted = MultiAttributeVote([LengthScorer(), FirstCharScorer()], inverted=[True, False])
    assert inverted(["x"], ["zz"], ["a"]) == [0.5]  # verbosity-like: longer loses
    assert vote(["x"], ["a"], ["a"]) == [1.0]  # ties count for a
    with pytest.raises(PreferenceError, match="inverted has 1 entries for 2 scorers"):
        MultiAttributeVote([LengthScorer(), FirstCharScorer()], inverted=[True])


def test_reward_model_scorer_runs_a_real_sequence_classification_head(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from slhf_models.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    scorer = RewardModelScorer(model, tok, batch_size=2)
    prompts = ["What is the map?", "Tell me about the river.", "Why does the cat read?"]
    answers = ["A short answer.", "The river is long and cold in the winter.", "Because."]
    batched = scorer.scores(prompts, answers)  # batches of 2 with left/right padding
    single = [scorer.scores([x], [y])[0] for x, y in zip(prompts, answers, strict=True)]
    assert batched == pytest.approx(single, abs=1e-4)  # padding does not change scores
    p = RewardModelPreference(scorer)(prompts, answers, answers[::-1])
    assert p[1] == pytest.approx(0.5) and all(0 < v < 1 for v in p)


def _judge_transport(letter_logprobs: dict[str, float], seen: list[dict]) -> httpx.MockTransport:  # type: ignore[type-arg]
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        user = body["messages"][1]["content"]
        # The judge prefers whichever answer says "good", wherever it is shown.
        good_first = user.index("good") < user.index("Answer B")
        la, lb = (letter_logprobs["win"], letter_logprobs["lose"])
        if not good_first:
            la, lb = lb, la
        top = [{"token": "A", "logprob": la}, {"token": " B", "logprob": lb}]
        choice = {"message": {"content": "A"}, "logprobs": {"content": [{"top_logprobs": top}]}}
        return httpx.Response(200, json={"choices": [choice]})

    return httpx.MockTransport(handler)


def test_llm_judge_uses_softmax_of_logprobs_and_undoes_the_swap() -> None:
    seen: list[dict] = []  # type: ignore[type-arg]
    client = httpx.Client(transport=_judge_transport({"win": -0.1, "lose": -2.5}, seen))
    judge = LLMJudgePreference("http://judge/v1", "j", client=client, seed=3)
    n = 16
    p = judge(["x"] * n, ["good"] * n, ["bad"] * n)
    expected = 1 / (1 + math.exp((-2.5 + 0.1) / 0.9))  # softmax([−0.1, −2.5] / 0.9)[0]
    assert p == pytest.approx([expected] * n)
    shown_first = [b["messages"][1]["content"].index("good") < 30 + len("x") for b in seen]
    assert 0 < sum(shown_first) < n  # both positions were used
    assert seen[0]["logprobs"] is True and seen[0]["max_tokens"] == 1
    again = LLMJudgePreference("http://judge/v1", "j", client=client, seed=3)
    assert again(["x"] * n, ["good"] * n, ["bad"] * n) == p  # seeded


def test_llm_judge_gives_half_on_errors_and_timeouts() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if b"boom" in request.content:
            raise httpx.ReadTimeout("slow judge")
        if b"junk" in request.content:
            return httpx.Response(200, json={"choices": [{"message": {"content": "?"}}]})
        return httpx.Response(500, json={"error": {"message": "down"}})

    judge = LLMJudgePreference(
        "http://judge", "j", client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    p = judge(["boom", "junk", "x"], ["a", "a", "a"], ["b", "b", "b"])
    assert p == [0.5, 0.5, 0.5]
    # each one is counted as a failure, with its reason (the trainer stops on too many)
    assert unscored(p) == p and all(isinstance(v, Unscored) for v in p)
    reasons = [v.reason for v in p]
    assert "ReadTimeout: slow judge" in reasons[0]
    assert "KeyError: 'logprobs'" in reasons[1]  # a reply without the logprobs asked for
    assert "HTTPStatusError" in reasons[2] and "500" in reasons[2]


def test_a_judge_reply_with_neither_letter_is_unscored() -> None:
    top = [{"token": "C", "logprob": -0.1}]
    choice = {"message": {"content": "C"}, "logprobs": {"content": [{"top_logprobs": top}]}}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"choices": [choice]}))
    judge = LLMJudgePreference("http://judge", "j", client=httpx.Client(transport=transport))
    p = judge(["x"] * 6, ["a"] * 6, ["b"] * 6)  # swapped pairs too: 1 − ½ stays unscored
    assert len(unscored(p)) == 6 and "neither A nor B" in p[0].reason  # type: ignore[attr-defined]


def test_reward_model_preference_counts_non_finite_rewards_and_does_not_overflow() -> None:
    rewards = {"nan": math.nan, "big": 1000.0, "small": -1000.0, "ok": 0.0}
    pref = RewardModelPreference(TableScorer(rewards))
    p = pref(["x"] * 3, ["nan", "big", "small"], ["ok", "small", "big"])
    assert [type(v) for v in p] == [Unscored, float, float]
    assert "non-finite" in p[0].reason  # type: ignore[attr-defined]
    assert p[1:] == [1.0, 0.0]  # σ(±2000) without math.exp overflowing
    assert unscored([0.5, 1.0]) == []  # an honest draw is not a failure
    vote = MultiAttributeVote([TableScorer(rewards), LengthScorer()])
    voted = vote(["x"] * 2, ["nan", "big"], ["ok", "ok"])
    assert isinstance(voted[0], Unscored) and voted[1] == 1.0  # NaN ≥ r is not a lost vote


def test_llm_judge_without_logprobs_reads_the_letter() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "logprobs" not in json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"message": {"content": " A"}}]})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    judge = LLMJudgePreference("http://judge", "j", client=client, logprobs=False, seed=0)
    p = judge(["x"] * 8, ["a"] * 8, ["b"] * 8)
    assert set(p) <= {0.0, 1.0} and len(set(p)) == 2  # "A" always; swaps map it to 1 or 0


def test_llm_judge_without_logprobs_counts_a_reply_that_is_no_letter() -> None:
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, json={"choices": [{"message": {"content": "Both"}}]})
    )
    judge = LLMJudgePreference("http://judge", "j", client=httpx.Client(transport=transport))
    judge.logprobs = False
    p = judge(["x"], ["a"], ["b"])
    assert p == [0.5] and "replied 'Both', not A or B" in p[0].reason  # type: ignore[attr-defined]
