"""slhf_models.eval: Wilson intervals, report assembly with fake generators, the three outputs."""

from __future__ import annotations

import json

import pytest

from slhf_models.eval import evaluate, markdown_table, wilson_interval, win_rate, write_outputs
from slhf_models.preferences import CallablePreference
from slhf_models.tasks.arith import TaskPreference, parse_prompt, sample_prompts


def test_wilson_interval_matches_hand_computed_values():
    # p̂ = 0.8, n = 10, z = 1.96: z²/n = 0.38416; centre = (0.8 + 0.19208) / 1.38416 = 0.71674;
    # half = 1.96 / 1.38416 · sqrt(0.016 + 0.009604) = 1.41602 · 0.160012 = 0.22658
    low, high = wilson_interval(0.8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # p̂ = 0.5, n = 4: centre 0.5; half = 1.96 / 1.9604 · sqrt(0.0625 + 0.060025) = 0.34997
    assert wilson_interval(0.5, 4) == pytest.approx((0.1500, 0.8500), abs=1e-4)
    # p̂ = 0 stays inside [0, 1]: (0, z²/n / (1 + z²/n)) = (0, 3.8415 / 23.8415) = (0, 0.1611)
    assert wilson_interval(0.0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)


def test_wilson_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        wilson_interval(1.5, 3)


def test_win_rate_counts_ties_as_half():
    r = win_rate("x", "a", "b", [1.0, 0.5, 0.5, 0.0])
    assert r.rate == 0.5 and r.ties == 2 and r.n == 4


class FakeGenerator:
    """A scripted model: the Leader answers with ``leader_error``; each Follower round moves the
    stated result ``step`` closer to the truth (or further when ``step`` < 0)."""

    def __init__(self, leader_error: int, step: int) -> None:
        self.leader_error = leader_error
        self.step = step
        self.calls: list[str] = []

    @staticmethod
    def _answer(prompt, error: int) -> str:
        p = parse_prompt(prompt)
        return f"{p.a} {'plus' if p.op == 'add' else 'minus'} {p.b} is {p.result + error}."

    def leader(self, prompts, seed):
        self.calls.append(f"leader:{seed}")
        return [self._answer(x, self.leader_error) for x in prompts]

    def follow(self, prompts, answers, seed):
        self.calls.append(f"follow:{seed}")
        out = []
        for x, y in zip(prompts, answers, strict=True):
            error = int(y.rstrip(".").split()[-1]) - parse_prompt(x).result
            out.append(self._answer(x, max(error - self.step, 0)))
        return out


def test_evaluate_assembles_every_report():
    prompts = sample_prompts(10, "test", seed=0)
    model, base, other = FakeGenerator(3, 1), FakeGenerator(5, 0), FakeGenerator(4, 0)
    report = evaluate(prompts, model, TaskPreference(), rounds=4, seed=7, base=base, other=other)
    by_name = {r["name"]: r for r in report["reports"]}
    assert list(by_name) == ["leader_vs_base", "follower_vs_leader", "cross_family", "control"]
    # error 3 vs error 5: wins "correct", ties the other four → 0.6 on every prompt
    assert by_name["leader_vs_base"]["rate"] == pytest.approx(0.6)
    assert by_name["follower_vs_leader"]["rate"] == pytest.approx(0.6)
    assert by_name["cross_family"]["rate"] == pytest.approx(0.6)
    assert by_name["control"]["rate"] == pytest.approx(0.5)  # step 0: the base copies: all ties
    assert by_name["control"]["ties"] == 10 and "other" in by_name["control"]["b"]
    curve = report["curve"]
    assert [p["round"] for p in curve] == [1, 2, 3, 4]
    # rounds reach error 0 at round 3; round 4 copies round 3
    assert [p["vs_round0"]["rate"] for p in curve] == pytest.approx([0.6, 0.6, 0.6, 0.6])
    assert [p["vs_previous"]["rate"] for p in curve] == pytest.approx([0.6, 0.6, 0.6, 0.5])
    for r in [*report["reports"], *(p[k] for p in curve for k in ("vs_round0", "vs_previous"))]:
        assert 0.0 <= r["low"] <= r["rate"] <= r["high"] <= 1.0
    assert model.calls == [
        "leader:7000",
        *(f"follow:{7000 + k}" for k in range(1, 5)),
        "follow:7051",
    ]
    assert report["examples"][0]["rounds"][0].endswith(".")


def test_evaluate_without_base_or_other_reports_the_follower_only():
    prompts = sample_prompts(4, "test", seed=0)
    report = evaluate(prompts, FakeGenerator(2, 1), TaskPreference(), rounds=2)
    assert [r["name"] for r in report["reports"]] == ["follower_vs_leader"]
    assert len(report["curve"]) == 2


def test_evaluate_control_uses_our_leader_answers_without_other():
    prompts = sample_prompts(4, "test", seed=0)
    report = evaluate(
        prompts, FakeGenerator(2, 1), TaskPreference(), rounds=1, base=FakeGenerator(2, -1)
    )
    control = report["reports"][-1]
    assert control["name"] == "control" and control["b"] == "our leader"
    assert control["rate"] == pytest.approx(0.4)  # the base makes the error worse


def test_evaluate_rejects_zero_rounds():
    with pytest.raises(ValueError, match="rounds"):
        evaluate(["Add 1 and 2."], FakeGenerator(0, 0), TaskPreference(), rounds=0)


def test_write_outputs(tmp_path):
    prompts = sample_prompts(5, "test", seed=0)
    report = evaluate(
        prompts, FakeGenerator(3, 1), CallablePreference(lambda x, a, b: 0.5), rounds=3
    )
    paths = write_outputs(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["rounds"] == 3
    table = paths["markdown"].read_text()
    assert table == markdown_table(report)
    assert "| follower_vs_leader | round 1 vs leader | 0.500 |" in table
    assert "round3_vs_previous" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
