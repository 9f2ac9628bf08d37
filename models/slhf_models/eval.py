"""Win-rate evaluation of a Leader/Follower pair (docs/trainer.md): the reports, their statistics,
output.

Every report compares two answers per prompt with a preference ``p(a ≻ b | x)`` and gives the
win rate ``mean_i p_i`` (a tie, ``p = ½``, counts as half a win) with a 95% Wilson interval on
``n`` prompts. The reports (``evaluate``):

- ``leader_vs_base``: our Leader ``y₀`` vs the warm-start base's Leader answer.
- ``follower_vs_leader``: one Follower round ``y₁ = F(x, y₀)`` vs its own Leader's ``y₀``.
- ``rounds``: ``y_k = F(x, y_{k−1})`` for k = 1..R, each vs ``y₀`` and vs ``y_{k−1}``.
- ``cross_family``: our Follower refining another model's answers ``z₀`` vs ``z₀`` unrefined.
- ``control``: the paper's control, the warm-start base merely prompted to improve (its own
  Follower template) on the same answers (``z₀`` when another model is given, else ``y₀``).

Models are ``Generator`` objects (``leader`` and ``follow``), so the statistics and the report
assembly are tested with fakes; ``slhf.eval_cli`` provides served ones and ``slhf eval``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from slhf_models.preferences import Preference
from slhf_models.serving.templates import Prompt

Z95 = 1.959964  # two-sided 95% normal quantile


class Generator(Protocol):
    """A model behind the two SLHF roles; ``seed`` makes a batch reproducible."""

    def leader(self, prompts: Sequence[Prompt], seed: int) -> list[str]: ...

    def follow(self, prompts: Sequence[Prompt], answers: Sequence[str], seed: int) -> list[str]: ...


@dataclass(frozen=True)
class WinRate:
    """``rate`` = mean preference of ``a`` over ``b`` on ``n`` prompts, ``[low, high]`` its CI."""

    name: str
    a: str
    b: str
    rate: float
    low: float
    high: float
    n: int
    ties: int


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``rate`` observed on ``n`` trials.

    Fractional wins (ties as ½, or soft preferences) enter through ``rate`` as they are.
    """
    if n <= 0:
        raise ValueError(f"a win rate needs at least one prompt; got n={n}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1]; got {rate}")
    z2n = z * z / n
    center = (rate + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(rate * (1 - rate) / n + z2n / (4 * n))
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(name: str, a: str, b: str, prefs: Sequence[float]) -> WinRate:
    rate = sum(prefs) / len(prefs) if prefs else math.nan
    low, high = wilson_interval(rate, len(prefs))
    ties = sum(p == 0.5 for p in prefs)
    return WinRate(name, a, b, rate, low, high, len(prefs), ties)


# -- the reports -------------------------------------------------------------------------------
def _seed(seed: int, stage: int) -> int:
    return seed * 1_000 + stage  # one distinct seed per stage; the generator adds the prompt index


def evaluate(
    prompts: Sequence[Prompt],
    model: Generator,
    preference: Preference,
    *,
    rounds: int = 4,
    seed: int = 0,
    base: Generator | None = None,
    other: Generator | None = None,
    examples: int = 3,
    keep_answers: bool = False,
) -> dict[str, Any]:
    """Run every report that the given generators allow; return a JSON-ready dict.

    ``keep_answers`` adds ``answers``: ``{"chain": [round 0 answers, round 1 answers, ...],
    "base": the base's Leader answers or None}``, for reports built on the same samples.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (the Follower reports need one); got {rounds}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    x = list(prompts)

    def compare(name: str, a_name: str, a: list[str], b_name: str, b: list[str]) -> WinRate:
        return win_rate(name, a_name, b_name, preference(x, a, b))

    answers = [model.leader(x, _seed(seed, 0))]  # answers[k] = round k, y_0 the Leader's
    for k in range(1, rounds + 1):
        answers.append(model.follow(x, answers[k - 1], _seed(seed, k)))
    reports: list[WinRate] = []
    base_answers = None
    if base is not None:
        base_answers = base.leader(x, _seed(seed, 0))
        reports.append(compare("leader_vs_base", "leader", answers[0], "base", base_answers))
    reports.append(compare("follower_vs_leader", "round 1", answers[1], "leader", answers[0]))
    curve = [
        {
            "round": k,
            "vs_round0": asdict(
                compare(f"round{k}_vs_round0", f"round {k}", answers[k], "round 0", answers[0])
            ),
            "vs_previous": asdict(
                compare(
                    f"round{k}_vs_previous",
                    f"round {k}",
                    answers[k],
                    f"round {k - 1}",
                    answers[k - 1],
                )
            ),
        }
        for k in range(1, rounds + 1)
    ]
    given, given_name = answers[0], "our leader"
    if other is not None:
        given, given_name = other.leader(x, _seed(seed, 50)), "other"
        refined = model.follow(x, given, _seed(seed, 51))
        reports.append(compare("cross_family", "follower(other)", refined, "other", given))
    if base is not None:
        prompted = base.follow(x, given, _seed(seed, 52))
        reports.append(
            compare(
                "control", f"base prompted to improve({given_name})", prompted, given_name, given
            )
        )
    report: dict[str, Any] = {
        "n_prompts": len(x),
        "rounds": rounds,
        "seed": seed,
        "reports": [asdict(r) for r in reports],
        "curve": curve,
        "examples": [
            {"prompt": x[i], "rounds": [a[i] for a in answers]}
            for i in range(min(examples, len(x)))
        ],
    }
    if keep_answers:
        report["answers"] = {"chain": answers, "base": base_answers}
    return report


# -- output ------------------------------------------------------------------------------------
def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['name']} | {r['a']} vs {r['b']} | {r['rate']:.3f} | "
        f"[{r['low']:.3f}, {r['high']:.3f}] | {r['n']} | {r['ties']} |"
    )


def markdown_table(report: dict[str, Any]) -> str:
    """The reports and the per-round curve as one Markdown table."""
    lines = [f"Command: `{report['command']}`", ""] if "command" in report else []
    lines += [
        f"Win rates on {report['n_prompts']} prompts (ties count ½; 95% Wilson intervals).",
        "",
        "| report | comparison | win rate | 95% CI | n | ties |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in report["reports"]]
    for point in report["curve"]:
        lines += [_row(point["vs_round0"]), _row(point["vs_previous"])]
    text = "\n".join(lines) + "\n"
    if "twin" in report:
        from slhf_models.tasks.condorcet_twin import twin_markdown

        text += twin_markdown(report["twin"])
    return text


def plot_curve(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of the per-round curve: round k vs round 0 and vs round k−1, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [p["round"] for p in report["curve"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, shift in (
        ("vs_round0", "vs round 0", -0.05),
        ("vs_previous", "vs round k−1", 0.05),
    ):
        rates = [p[key]["rate"] for p in report["curve"]]
        errs = [
            [p[key]["rate"] - p[key]["low"] for p in report["curve"]],
            [p[key]["high"] - p[key]["rate"] for p in report["curve"]],
        ]
        ax.errorbar(
            [r + shift for r in rounds], rates, yerr=errs, marker="o", capsize=3, label=label
        )
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="refinement round k", ylabel="win rate of round k", ylim=(0, 1), xticks=rounds)
    ax.set_title(f"Follower rounds ({report['n_prompts']} prompts, 95% Wilson CI)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``eval.json``, ``eval.md`` and ``eval_rounds.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "eval.json",
        "markdown": out / "eval.md",
        "plot": out / "eval_rounds.png",
    }
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(report), encoding="utf-8")
    plot_curve(report, paths["plot"])
    return paths
