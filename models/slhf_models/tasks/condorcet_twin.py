"""The tabular twin of the Condorcet task (docs/demo.md): what theory predicts for a trained model.

The text task (models/slhf_models/tasks/condorcet.py) reduces, among clean answers, to the paper's
3-action
Condorcet game over the styles A, B, C with ``P = condorcet_preferences(SHARES)``. Its
Stackelberg equilibrium has a closed form (``slhf_models.game.closed_form``) once the references are
known; here they are *measured*: the base model's Leader style distribution ``π_ref`` and its
Follower style-response matrix ``ω_ref`` (row s: the styles it answers with when given a clean
answer in style s). The twin then compares, as total variation,

- the trained Leader's style distribution with the predicted ``π*``;
- the trained Follower's response matrix with the predicted ``ω*`` (each row; the worst row is
  the headline, as ``slhf_models.game.total_variation`` takes it);

and, per annotator group (favourite style A, B, C), how often the favourite has been reached
after 0, 1, 2, 3 Follower rounds: measured on the evaluation's refinement chains, predicted by
the twin's equilibrium, and by ``slhf game condorcet --shares 0.36 0.33 0.31`` (τ = 1e-3,
uniform references: the paper's idealised chain) beside NLHF resampling.

Styles are read with the task's checker; an answer in no style is counted apart (``none``) and
left out of the distributions. Reference entries are floored at ``REF_FLOOR`` (the closed form
needs a reference > 0 everywhere) and renormalised.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from slhf_models.game import (
    closed_form,
    condorcet_preferences,
    reach_probabilities,
    resampling_kernel,
    total_variation,
)
from slhf_models.game_solvers import nash_equilibrium
from slhf_models.serving.templates import Prompt
from slhf_models.tasks.condorcet import (
    SHARES,
    STYLES,
    classify,
    parse_prompt,
    render_answer,
    with_defects,
)

REF_FLOOR = 1e-3
#: ``slhf game condorcet``'s default τ: the paper's near-deterministic chain.
GAME_TAU = 1e-3
REACH_ROUNDS = 3


class Follower(Protocol):
    def follow(self, prompts: Sequence[Prompt], answers: Sequence[str], seed: int) -> list[str]: ...


def style_counts(answers: Sequence[str]) -> dict[str, int]:
    """How many answers the checker reads in each style, and in none."""
    counts = dict.fromkeys([*STYLES, "none"], 0)
    for answer in answers:
        counts[classify(answer) or "none"] += 1
    return counts


def style_distribution(answers: Sequence[str]) -> np.ndarray:
    """Shares of A, B, C among answers that have a style (uniform when none has one)."""
    counts = style_counts(answers)
    c = np.array([counts[s] for s in STYLES], dtype=np.float64)
    return c / c.sum() if c.sum() else np.full(len(STYLES), 1 / len(STYLES))


def clean_answers(prompts: Sequence[Prompt], style: str, seed: int = 0) -> list[str]:
    """A defect-free answer to each prompt in ``style`` (things drawn with ``seed``)."""
    rng = random.Random(f"twin:{seed}")
    out = []
    for x in prompts:
        facts = parse_prompt(x)
        out.append(render_answer(style, facts, with_defects(facts, (), rng)[0]))
    return out


def response_matrix(
    model: Follower, prompts: Sequence[Prompt], seed: int
) -> tuple[np.ndarray, list[dict[str, int]]]:
    """Row s: style shares of the model's Follower answers to clean answers in style s."""
    rows, counts = [], []
    for i, style in enumerate(STYLES):
        given = clean_answers(prompts, style, seed)
        answers = model.follow(prompts, given, seed * 1_000 + 70 + i)
        rows.append(style_distribution(answers))
        counts.append(style_counts(answers))
    return np.stack(rows), counts


def _floored(policy: np.ndarray) -> np.ndarray:
    p = np.maximum(policy, REF_FLOOR)
    return p / p.sum(axis=-1, keepdims=True)


def measured_reach(
    chains: Sequence[Sequence[str]], rounds: int = REACH_ROUNDS
) -> list[list[float]]:
    """``out[g][k]``: share of chains whose answers 0..k include group g's favourite style.

    ``chains[k][i]`` is round k's answer to prompt i (round 0 the Leader's).
    """
    styles = [[classify(a) for a in chain] for chain in chains[: rounds + 1]]
    n = len(styles[0])
    out = []
    for favourite in STYLES:
        seen = [False] * n
        row = []
        for k in range(len(styles)):
            seen = [s or styles[k][i] == favourite for i, s in enumerate(seen)]
            row.append(sum(seen) / n)
        out.append(row)
    return out


def predicted_reach(leader: np.ndarray, follower: np.ndarray, rounds: int) -> list[list[float]]:
    """Per group g: P(favourite reached within answers 0..k) for the chain leader → follower."""
    return [
        reach_probabilities(leader, follower, [g], [1.0], rounds + 1).tolist()
        for g in range(len(STYLES))
    ]


def game_condorcet_reach(rounds: int = REACH_ROUNDS) -> dict[str, list[list[float]]]:
    """Per-group reach of ``slhf game condorcet --shares 0.36 0.33 0.31`` (τ = 1e-3)."""
    p = condorcet_preferences(SHARES)
    slhf = closed_form(p, GAME_TAU, GAME_TAU)
    nash = nash_equilibrium(p, GAME_TAU)
    return {
        "slhf": predicted_reach(slhf.leader, slhf.follower, rounds),
        "nash_resampling": predicted_reach(nash, resampling_kernel(nash), rounds),
    }


def twin_report(
    prompts: Sequence[Prompt],
    chains: Sequence[Sequence[str]],
    base_leader_answers: Sequence[str],
    model: Follower,
    base: Follower,
    *,
    tau_leader: float,
    tau_follower: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Predicted vs measured style policies and reach probabilities; a JSON-ready dict."""
    pi_ref = style_distribution(base_leader_answers)
    omega_ref, base_counts = response_matrix(base, prompts, seed)
    p = condorcet_preferences(SHARES)
    predicted = closed_form(p, tau_leader, tau_follower, _floored(pi_ref), _floored(omega_ref))
    leader = style_distribution(chains[0])
    follower, counts = response_matrix(model, prompts, seed)
    rows_tv = [total_variation(follower[i], predicted.follower[i]) for i in range(len(STYLES))]
    return {
        "styles": list(STYLES),
        "shares": list(SHARES),
        "preferences": p.tolist(),
        "tau_leader": tau_leader,
        "tau_follower": tau_follower,
        "n_prompts": len(prompts),
        "reference": {
            "leader": pi_ref.tolist(),
            "leader_counts": style_counts(base_leader_answers),
            "follower": omega_ref.tolist(),
            "follower_counts": base_counts,
        },
        "predicted": predicted.to_json(),
        "measured": {
            "leader": leader.tolist(),
            "leader_counts": style_counts(chains[0]),
            "follower": follower.tolist(),
            "follower_counts": counts,
        },
        "tv": {
            "leader": total_variation(leader, predicted.leader),
            "follower_rows": rows_tv,
            "follower": max(rows_tv),
        },
        "reach": {
            "rounds": list(range(REACH_ROUNDS + 1)),
            "measured": measured_reach(chains),
            "twin": predicted_reach(predicted.leader, predicted.follower, REACH_ROUNDS),
            "game_condorcet": game_condorcet_reach(),
        },
    }


def _fmt(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def twin_markdown(twin: dict[str, Any]) -> str:
    """The twin's comparison as Markdown (appended to eval.md)."""
    tv = twin["tv"]
    lines = [
        "",
        f"## Tabular twin (3-style Condorcet game, τL = {twin['tau_leader']:g}, "
        f"τF = {twin['tau_follower']:g}, references measured on the base)",
        "",
        "| policy | base (reference) | predicted π*/ω* | measured | TV |",
        "|---|---|---|---|---|",
        f"| Leader P(A / B / C) | {_fmt(twin['reference']['leader'])} | "
        f"{_fmt(twin['predicted']['leader'])} | {_fmt(twin['measured']['leader'])} | "
        f"{tv['leader']:.3f} |",
    ]
    for i, s in enumerate(twin["styles"]):
        lines.append(
            f"| Follower given {s}: P(A / B / C) | {_fmt(twin['reference']['follower'][i])} | "
            f"{_fmt(twin['predicted']['follower'][i])} | {_fmt(twin['measured']['follower'][i])} "
            f"| {tv['follower_rows'][i]:.3f} |"
        )
    reach = twin["reach"]
    lines += [
        "",
        "Reach: share of chains in which the group's favourite style has appeared after "
        "0 / 1 / 2 / 3 Follower rounds.",
        "",
        "| group (favourite) | measured | twin | slhf game condorcet | NLHF resampling |",
        "|---|---|---|---|---|",
    ]
    for g, s in enumerate(twin["styles"]):
        lines.append(
            f"| {g + 1} ({s}, share {twin['shares'][g]:.2f}) | {_fmt(reach['measured'][g])} | "
            f"{_fmt(reach['twin'][g])} | {_fmt(reach['game_condorcet']['slhf'][g])} | "
            f"{_fmt(reach['game_condorcet']['nash_resampling'][g])} |"
        )
    return "\n".join(lines) + "\n"
