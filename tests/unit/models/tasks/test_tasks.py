"""The arithmetic task: splits, attribute scorers, the vote, cycles and demonstrations."""

from __future__ import annotations

import json
import random

import pytest

from slhf_models.preferences import PreferenceError
from slhf_models.tasks import arith
from slhf_models.tasks.arith import Problem, TaskPreference, attribute_scores, parse_prompt, vote
from slhf_models.tasks.graphs import cycle_share, has_cycle, preference_edges

X = "Add 17 and 25."
# A Condorcet triple, each beating the next on 3 of 5 attributes (ties: 1 of 5 each, ½ each):
#   "17 plus 25 is 43." ≻ "25: 44."          correct (−1 > −2), relevant (1 > ½); brief loses
#   "25: 44."           ≻ "Sure! It is 42."  relevant (½ > 0), brief (−2 > −3); correct loses
#   "Sure! It is 42."   ≻ "17 plus 25 is 43." correct (0 > −1), brief (−3 > −4); relevant loses
TRIPLE = ("17 plus 25 is 43.", "25: 44.", "Sure! It is 42.")


def test_splits_are_disjoint_and_seeded():
    train = arith.sample_prompts(2000, "train", seed=0)
    test = arith.sample_prompts(500, "test", seed=0)
    assert not set(map(parse_prompt, train)) & set(map(parse_prompt, test))
    assert arith.sample_prompts(50, "test", seed=3) == arith.sample_prompts(50, "test", seed=3)
    assert arith.sample_prompts(50, "test", seed=3) != arith.sample_prompts(50, "test", seed=4)
    assert len(set(train)) == 2000


def test_split_membership_does_not_depend_on_the_sampling_seed():
    a = {parse_prompt(x) for x in arith.sample_prompts(300, "test", seed=1)}
    b = {parse_prompt(x) for x in arith.sample_prompts(300, "train", seed=2)}
    assert all(arith.split_of(p.op, p.a, p.b) == "test" for p in a)
    assert all(arith.split_of(p.op, p.a, p.b) == "train" for p in b)


def test_asking_for_more_prompts_than_a_split_holds_is_an_error():
    with pytest.raises(arith.TaskError, match="holds"):
        arith.sample_problems(arith.split_size("test") + 1, "test")


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        ("Add 17 and 25.", Problem("add", 17, 25)),
        ("What is 3 plus 0?", Problem("add", 3, 0)),
        ("Subtract 8 from 30.", Problem("sub", 30, 8)),
        ("What is 30 minus 8?", Problem("sub", 30, 8)),
        ([{"role": "user", "content": "Add 1 and 2."}], Problem("add", 1, 2)),
    ],
)
def test_parse_prompt(prompt, problem):
    assert parse_prompt(prompt) == problem


def test_parse_prompt_rejects_other_text():
    with pytest.raises(arith.TaskError, match="not an arithmetic"):
        parse_prompt("Tell me a story.")


def test_scorers_on_hand_written_answers():
    assert attribute_scores(X, "17 plus 25 is 42.") == {
        "correct": 0.0,
        "relevant": 1.0,
        "brief": -5.0,
        "fresh": 0.0,
        "ended": 1.0,
    }
    assert attribute_scores(X, "17 plus 25 is 45") == {
        "correct": -3.0,
        "relevant": 1.0,
        "brief": -5.0,
        "fresh": 0.0,
        "ended": 0.0,
    }
    # the statement said twice repeats 4 of its 9 word bigrams
    rep = attribute_scores(X, "17 plus 25 is 42. 17 plus 25 is 42.")
    assert rep["fresh"] == -4.0 and rep["correct"] == 0.0
    assert attribute_scores(X, "Sure!")["correct"] == -arith.MAX_ERROR
    assert attribute_scores(X, "42.")["relevant"] == 0.0
    assert attribute_scores(X, "Plus 25 is 42.")["relevant"] == 0.5
    assert attribute_scores("Add 4 and 4.", "4 plus 4 is 8.")["relevant"] == 1.0
    assert attribute_scores("Add 4 and 4.", "Plus 4 is 8.")["relevant"] == 0.5


def test_vote_counts_ties_as_half():
    assert vote(X, "17 plus 25 is 42.", "17 plus 25 is 42.") == 0.5
    # wins correct; ties relevant, brief, fresh, ended: (1 + 4 · ½) / 5
    assert vote(X, "17 plus 25 is 42.", "17 plus 25 is 43.") == pytest.approx(0.6)


def test_preference_is_antisymmetric():
    rng = random.Random(0)
    rows = arith.demonstrations(200, seed=1)
    prompts = [r["prompt"] for r in rows]
    a = [r["answer"] for r in rows]
    b = [a[rng.randrange(len(a))] for _ in a]  # answers to other prompts too
    pref = TaskPreference()
    for pab, pba in zip(pref(prompts, a, b), pref(prompts, b, a), strict=True):
        assert pab + pba == pytest.approx(1.0)
        assert 0.0 <= pab <= 1.0


def test_preference_checks_its_inputs():
    with pytest.raises(PreferenceError, match="same length"):
        TaskPreference()([X], ["a"], [])
    with pytest.raises(PreferenceError, match="subset"):
        TaskPreference(["wit"])


def test_an_intransitive_triple_exists_and_the_cycle_measure_finds_it():
    a, b, c = TRIPLE
    assert vote(X, a, b) > 0.5 and vote(X, b, c) > 0.5 and vote(X, c, a) > 0.5
    edges = preference_edges(X, list(TRIPLE), TaskPreference())
    assert sorted(edges) == [(0, 1), (1, 2), (2, 0)]
    assert cycle_share([X, X], [list(TRIPLE), ["17 plus 25 is 42.", "42"]], TaskPreference()) == 0.5


def test_has_cycle():
    assert not has_cycle(3, [(0, 1), (1, 2), (0, 2)])
    assert has_cycle(4, [(0, 1), (1, 2), (2, 3), (3, 1)])
    assert not has_cycle(2, [])


def test_demonstrations_are_mixed_and_seeded(tmp_path):
    rows = arith.demonstrations(1000, seed=0)
    assert rows == arith.demonstrations(1000, seed=0)
    styles = [r["style"] for r in rows]
    assert 0.2 < styles.count("correct") / len(rows) < 0.4
    for defect in arith.DEMO_DEFECTS:
        assert any(defect in s.split("+") for s in styles), defect
    correct = [
        vote(r["prompt"], r["answer"], arith.parse_prompt(r["prompt"]).canonical()) for r in rows
    ]
    assert sum(p < 0.5 for p in correct) > 300  # plenty of room to improve on the base
    path = arith.write_jsonl(rows[:3], tmp_path / "demos.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]


def test_follower_rows_carry_an_independent_response():
    rows = arith.demonstrations(400, seed=0, follower_share=0.5)
    follower = [r for r in rows if "response" in r]
    assert 150 < len(follower) < 250
    for r in follower:  # both answer the row's own problem
        problem = arith.parse_prompt(r["prompt"])
        assert str(problem.b) in r["response"] or arith.score_correct(problem, r["response"]) > -10
    # format only: the target is not conditioned on the response (it equals it no more often
    # than two independent draws of the mix do)
    same = sum(r["answer"] == r["response"] for r in follower) / len(follower)
    assert same < 0.3
    assert [r for r in arith.demonstrations(400, seed=0) if "response" in r] == []
    with pytest.raises(arith.TaskError, match="follower_share"):
        arith.demonstrations(10, follower_share=1.5)


def test_demo_cycle_share_is_a_share():
    share = arith.demo_cycle_share(50, 8, seed=0)
    assert 0.0 <= share <= 1.0
