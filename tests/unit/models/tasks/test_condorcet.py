"""The Condorcet task: prompts and splits, the checker, the preference, the demonstrations."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import numpy as np
import pytest

from slhf_models.game import closed_form, condorcet_preferences
from slhf_models.tasks import task_module
from slhf_models.tasks.arith import TaskError
from slhf_models.tasks.condorcet import (
    DEMO_OBJECTS,
    SHARES,
    STYLES,
    CondorcetPreference,
    Facts,
    all_facts,
    check,
    classify,
    condorcet_vote,
    demonstrations,
    named_things,
    parse_prompt,
    render_answer,
    sample_facts,
    sample_prompts,
    split_of,
    style_preference,
    with_defects,
)
from slhf_models.tiny import build_tokenizer

PROMPT = "Name 4 red things the baker has."
THINGS = [("red", "apple"), ("red", "river"), ("red", "map"), ("red", "book")]


def answer(style: str, things=THINGS, *, ended: bool = True, prompt: str = PROMPT) -> str:
    return render_answer(style, parse_prompt(prompt), things, ended)


def test_splits_are_disjoint_seeded_and_prompts_parse() -> None:
    train, test = all_facts("train"), all_facts("test")
    assert not set(train) & set(test) and len(train) + len(test) == 24 * 28 * 3
    assert len(test) >= 300  # room for 256 distinct held-out prompts
    assert {split_of(f) for f in train} == {"train"} and {split_of(f) for f in test} == {"test"}
    assert sample_prompts(20, "test", seed=3) == sample_prompts(20, "test", seed=3)
    assert sample_prompts(20, "test", seed=3) != sample_prompts(20, "test", seed=4)
    assert len(set(sample_prompts(len(test), "test", seed=1))) == len(test)
    prompts = sample_prompts(10, "test", seed=1)
    assert [parse_prompt(p) for p in prompts] == sample_facts(10, "test", seed=1)
    assert parse_prompt(PROMPT) == Facts("baker", "red", 4)
    with pytest.raises(TaskError, match="not a condorcet task prompt"):
        parse_prompt("Add 17 and 25.")


def test_clean_answers_in_each_style_are_read_as_that_style_without_defects() -> None:
    for style in STYLES:
        verdict = check(PROMPT, answer(style))
        assert verdict.style == style and verdict.defects == 0, (style, verdict)
    span = "red apple, red river, red map and red book"
    assert answer("A") == f"Here is a fact: the baker has 4 red things: {span}."
    assert answer("B") == f"Here is a list of 4 red things for the baker: {span}. That is all."
    assert answer("C") == f"Once upon a time the baker found 4 red things: {span}. The end."
    assert classify("17 plus 25 is 42.") is None and classify("") is None
    assert classify("Here is a song.") is None


def test_clean_answers_are_25_to_60_tokens_long() -> None:
    tokenizer = build_tokenizer()
    rows = demonstrations(300, seed=0)
    lengths = [len(tokenizer.encode(r["answer"])) for r in rows if not r["defects"]]
    assert min(lengths) >= 25 and max(lengths) <= 60, (min(lengths), max(lengths))


@pytest.mark.parametrize(
    ("things", "ended", "counts"),
    [
        ([*THINGS[:3], ("blue", "book")], True, (1, 0, 0, 0)),  # a thing without the property
        ([*THINGS, ("red", "song")], True, (1, 0, 0, 0)),  # more things than asked
        (THINGS[:3], True, (0, 1, 0, 0)),  # fewer
        (THINGS[:2] + THINGS[1:3], True, (0, 1, 1, 0)),  # one named twice, one missing
        (THINGS + THINGS[:1], True, (0, 0, 1, 0)),  # five names, four different things
        (THINGS, False, (0, 0, 0, 1)),
    ],
)
def test_the_checker_counts_each_defect_in_every_style(things, ended, counts) -> None:
    for style in STYLES:
        v = check(PROMPT, answer(style, things, ended=ended))
        assert v.style == style
        assert (v.wrong, v.missing, v.repeated, v.unended) == counts, (style, v)


def test_the_checker_reads_a_wrong_or_missing_subject_and_trailing_text() -> None:
    assert check(PROMPT, answer("A").replace("baker", "pilot")).wrong == 1
    assert check(PROMPT, answer("A").replace("the baker", "the one")).missing == 1
    assert check(PROMPT, answer("C") + " And then").unended == 1
    garbage = check(PROMPT, "apple apple")
    assert garbage.style is None and garbage.missing == 5 and garbage.unended == 1


def test_demo_defects_each_cost_one() -> None:
    facts = parse_prompt(PROMPT)
    for defects in [("wrong",), ("missing",), ("repeated",), ("unended",), ("wrong", "missing")]:
        for seed in range(20):
            things, ended = with_defects(facts, defects, random.Random(seed))
            for style in STYLES:
                v = check(PROMPT, render_answer(style, facts, things, ended))
                assert v.defects == len(defects), (defects, things, v)


def test_style_preferences_are_the_papers_condorcet_numbers() -> None:
    # clean Leader in A, B, C: the best Follower style (C, A, B) wins 0.64, 0.67, 0.69
    assert style_preference("C", "A") == pytest.approx(0.64)
    assert style_preference("A", "B") == pytest.approx(0.67)
    assert style_preference("B", "C") == pytest.approx(0.69)
    best = {y: max(style_preference(z, y) for z in STYLES) for y in STYLES}
    assert best == pytest.approx({"A": 0.64, "B": 0.67, "C": 0.69})
    # the Leader's best style is A: the least exploitable, it keeps 0.36 (the largest share)
    keeps = {y: min(style_preference(y, z) for z in STYLES) for y in STYLES}
    assert keeps == pytest.approx({"A": 0.36, "B": 0.33, "C": 0.31})
    assert max(keeps, key=keeps.__getitem__) == "A"
    # the same matrix as slhf_models.game's Condorcet example with these shares
    matrix = [[style_preference(a, b) for b in STYLES] for a in STYLES]
    np.testing.assert_allclose(matrix, condorcet_preferences(SHARES), atol=1e-12)
    assert closed_form(matrix, 1e-3, 1e-3).leader.argmax() == 0


def test_fewer_defects_win_for_every_group_then_styles_decide() -> None:
    clean_b, repeated_a = answer("B"), answer("A", THINGS + THINGS[:1])
    assert condorcet_vote(PROMPT, clean_b, repeated_a) == 1.0
    assert condorcet_vote(PROMPT, answer("A", THINGS[:2]), repeated_a) == 0.0  # 2 missing
    # equal defects: the style ranking decides, even with different defects
    assert condorcet_vote(PROMPT, answer("C", ended=False), repeated_a) == pytest.approx(0.64)
    assert condorcet_vote(PROMPT, answer("A"), answer("A", THINGS[::-1])) == 0.5
    # an answer in no style is last for every group
    no_style = answer("A").replace("Here is a fact:", "Fact:")
    assert condorcet_vote(PROMPT, answer("C"), no_style) == 1.0


def test_the_preference_is_complementary_and_batched() -> None:
    rng = random.Random(0)
    variants = [THINGS, THINGS[:3], THINGS + THINGS[:1], [*THINGS[:3], ("old", "map")]]
    pool = [answer(s, t, ended=e) for s in STYLES for t in variants for e in (True, False)]
    pairs = [(rng.choice(pool), rng.choice(pool)) for _ in range(80)]
    pref = task_module("condorcet").TaskPreference()
    p = pref([PROMPT] * 80, [a for a, _ in pairs], [b for _, b in pairs])
    q = pref([PROMPT] * 80, [b for _, b in pairs], [a for a, _ in pairs])
    assert all(x + y == pytest.approx(1.0) for x, y in zip(p, q, strict=True))
    assert {round(x, 2) for x in p} <= {0.0, 0.31, 0.33, 0.36, 0.5, 0.64, 0.67, 0.69, 1.0}
    with pytest.raises(ValueError, match="shares"):
        CondorcetPreference((0.5, 0.5, 0.5))


def test_demonstrations_have_equal_styles_half_defects_and_faithful_rewrites() -> None:
    rows = demonstrations(3000, seed=0, follower_share=0.5)
    leader = [r for r in rows if "response" not in r]
    follower = [r for r in rows if "response" in r]
    assert 0.45 < len(follower) / len(rows) < 0.55
    styles = Counter(check(r["prompt"], r["answer"]).style for r in leader)
    assert all(abs(styles[s] / len(leader) - 1 / 3) < 0.04 for s in STYLES), styles
    defective = sum(check(r["prompt"], r["answer"]).defects > 0 for r in rows) / len(rows)
    assert 0.45 < defective < 0.55
    for r in rows:
        assert check(r["prompt"], r["answer"]).style == r["style"]
    # Follower rows: the same content with the same defects, in a uniformly drawn style
    for r in follower:
        given, target = check(r["prompt"], r["response"]), check(r["prompt"], r["answer"])
        assert given == dataclasses.replace(target, style=given.style)
        assert named_things(r["response"]) == named_things(r["answer"])
    targets = Counter(r["style"] for r in follower)
    assert all(abs(targets[s] / len(follower) - 1 / 3) < 0.05 for s in STYLES), targets
    # the target keeps the given style half the time; the other two are equally likely, so the
    # rows say nothing about which style beats which
    moves = Counter((check(r["prompt"], r["response"]).style, r["style"]) for r in follower)
    for given in STYLES:
        total = sum(n for (g, _), n in moves.items() if g == given)
        others = [moves[(given, t)] / total for t in STYLES if t != given]
        assert abs(moves[(given, given)] / total - 0.5) < 0.06, moves
        assert abs(others[0] - others[1]) < 0.08, moves


def test_demonstrations_name_the_first_count_demo_objects() -> None:
    # the content is set by the prompt: clean rows name exactly the first `count` DEMO_OBJECTS
    clean = [r for r in demonstrations(600, seed=3) if not r["defects"]]
    assert len(clean) > 200
    for r in clean:
        facts = parse_prompt(r["prompt"])
        expected = [(facts.adjective, o) for o in DEMO_OBJECTS[: facts.count]]
        assert named_things(r["answer"]) == expected, r


def test_demonstrations_use_training_prompts_only() -> None:
    rows = demonstrations(500, seed=2)
    assert {split_of(parse_prompt(r["prompt"])) for r in rows} == {"train"}
    with pytest.raises(TaskError, match="follower_share"):
        demonstrations(5, follower_share=1.5)
