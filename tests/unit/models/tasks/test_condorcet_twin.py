"""The Condorcet task's tabular twin (models/slhf_models/tasks/condorcet_twin.py) with scripted
models."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest

from slhf_models.eval import evaluate, markdown_table
from slhf_models.game_cli import run_game
from slhf_models.tasks.condorcet import (
    SHARES,
    CondorcetPreference,
    classify,
    parse_prompt,
    render_answer,
    sample_prompts,
    with_defects,
)
from slhf_models.tasks.condorcet_twin import (
    game_condorcet_reach,
    measured_reach,
    style_distribution,
    twin_report,
)

BEST_RESPONSE = {"A": "C", "B": "A", "C": "B"}  # the Follower's best style against each


class ScriptedModel:
    """Leader: style ``leader_style`` (or uniform when None). Follower: ``respond[given style]``
    (or uniform when None), always clean."""

    def __init__(self, leader_style: str | None, respond: dict[str, str] | None) -> None:
        self.leader_style, self.respond = leader_style, respond

    def _answer(self, prompt: str, style: str) -> str:
        facts = parse_prompt(prompt)
        return render_answer(style, facts, with_defects(facts, (), random.Random(0))[0])

    def leader(self, prompts, seed):
        rng = random.Random(seed)
        return [self._answer(x, self.leader_style or rng.choice("ABC")) for x in prompts]

    def follow(self, prompts, answers, seed):
        rng = random.Random(seed)
        styles = [
            self.respond[classify(y) or "A"] if self.respond else rng.choice("ABC") for y in answers
        ]
        return [self._answer(x, s) for x, s in zip(prompts, styles, strict=True)]


def test_style_distribution_counts_styles_and_leaves_out_answers_without_one() -> None:
    prompt = sample_prompts(1, "test")[0]
    facts = parse_prompt(prompt)
    things = with_defects(facts, (), random.Random(0))[0]
    answers = [render_answer(s, facts, things) for s in "AAB"] + ["gibberish"]
    np.testing.assert_allclose(style_distribution(answers), [2 / 3, 1 / 3, 0.0])


def test_measured_reach_follows_each_chain() -> None:
    prompt = sample_prompts(1, "test")[0]
    facts = parse_prompt(prompt)

    def a(style: str) -> str:
        return render_answer(style, facts, with_defects(facts, (), random.Random(0))[0])

    chains = [[a("A"), a("B")], [a("C"), a("B")], [a("B"), a("B")], [a("A"), a("A")]]
    # prompt 0 sees A, C, B, A; prompt 1 sees B, B, B, A
    assert measured_reach(chains) == [
        [0.5, 0.5, 0.5, 1.0],
        [0.5, 0.5, 1.0, 1.0],
        [0, 0.5, 0.5, 0.5],
    ]


def test_game_condorcet_reach_is_what_slhf_game_condorcet_prints(capsys) -> None:
    args = argparse.Namespace(game_command="condorcet", shares=list(SHARES), tau=1e-3, rounds=4)
    assert run_game(args) == 0
    printed = json.loads(capsys.readouterr().out)["reach"]
    ours = game_condorcet_reach()
    for key in ("slhf", "nash_resampling"):
        weighted = np.asarray(SHARES) @ np.asarray(ours[key])
        np.testing.assert_allclose(weighted, printed[key], atol=1e-9)
    # the paper's chain: favourite A at once, C after one round, B after two
    np.testing.assert_allclose(ours["slhf"], [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]], atol=1e-3)


def test_a_model_at_the_equilibrium_is_close_to_the_twin_and_reaches_like_the_paper() -> None:
    prompts = sample_prompts(60, "test", seed=1)
    model = ScriptedModel("A", BEST_RESPONSE)
    base = ScriptedModel(None, None)
    report = evaluate(prompts, model, CondorcetPreference(), rounds=3, base=base, keep_answers=True)
    answers = report["answers"]
    taus = {"tau_leader": 1e-3, "tau_follower": 1e-3}  # the equilibrium is then near-pure
    twin = twin_report(prompts, answers["chain"], answers["base"], model, base, **taus)
    assert twin["measured"]["leader"] == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(twin["measured"]["follower"], [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    assert twin["tv"]["leader"] < 0.01 and twin["tv"]["follower"] < 0.01
    assert twin["reach"]["measured"] == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    np.testing.assert_allclose(twin["reach"]["twin"], twin["reach"]["measured"], atol=0.01)
    # a Follower that keeps the style is far from the twin's response matrix
    stubborn = ScriptedModel("A", {"A": "A", "B": "B", "C": "C"})
    far = twin_report(prompts, answers["chain"], answers["base"], stubborn, base, **taus)
    assert far["tv"]["follower"] > 0.9
    report["twin"] = twin
    text = markdown_table(report)
    assert "Tabular twin" in text and "| Follower given A: P(A / B / C) |" in text


def test_the_twin_uses_the_measured_references() -> None:
    prompts = sample_prompts(90, "test", seed=2)
    model = ScriptedModel("A", BEST_RESPONSE)
    always_b = ScriptedModel("B", {"A": "B", "B": "B", "C": "B"})
    chains = [model.leader(prompts, 0)]
    twin = twin_report(
        prompts, chains, always_b.leader(prompts, 0), model, always_b, tau_leader=1.0,
        tau_follower=1.0,
    )  # fmt: skip
    # at a large τ the equilibrium stays near the (floored) references, which are all B
    assert twin["predicted"]["leader"][1] > 0.9
    assert all(row[1] > 0.9 for row in twin["predicted"]["follower"])
    assert twin["tv"]["leader"] == pytest.approx(1.0 - twin["predicted"]["leader"][0], abs=1e-9)
