"""Evaluation on held-out prompts: does the Follower improve on its own Leader's answer?

Every ``eval_every`` steps, per held-out prompt ``x``: a Leader answer ``y ~ π(·|T_L(x))``, a
Follower answer ``y' ~ π(·|T_F(x, y))`` and ``p(y' ≻ y | x)`` from the training preference. The
mean is ``eval/follower_vs_leader`` (the paper's "Follower beats its own Leader's answer": 60.5%
on HelpSteer2); ``eval/leader_length`` and ``eval/follower_length`` are mean answer lengths in
tokens. Sampling uses its own seeded RNG stream (``torch.random.fork_rng``), so evaluating does
not change the training run's samples: a run with evaluation trains exactly as one without.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from slhf_models.preferences import Preference
from slhf_models.serving.templates import Prompt
from slhf_models.trainer.rollouts import RolloutPair

PairFn = Callable[[list[Prompt]], RolloutPair]
"""Samples a batch's Leader answers, then its Follower answers on them (the trainer's
``sample_pair``: the Follower prompt spliced as the server does)."""


def follower_vs_leader(
    prompts: Sequence[Prompt],
    *,
    sample_pair: PairFn,
    preference: Preference,
    batch_size: int,
    seed: int,
) -> list[tuple[float, float, float]]:
    """Per prompt: ``(p(y' ≻ y | x), leader length, follower length)``."""
    rows: list[tuple[float, float, float]] = []
    # Sampling on a GPU draws from the CUDA generators: fork those too, or evaluating would move
    # the training run's random stream.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            batch = list(prompts[i : i + batch_size])
            pair = sample_pair(batch)
            leader, follower = pair.leader, pair.follower
            prefs = preference(batch, follower.texts, leader.texts)
            a, b = leader.answer_mask.sum(1).tolist(), follower.answer_mask.sum(1).tolist()
            rows += [(float(p), float(x), float(y)) for p, x, y in zip(prefs, a, b, strict=True)]
    return rows


def summary(rows: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    n = max(len(rows), 1)
    return {
        "eval/follower_vs_leader": sum(r[0] for r in rows) / n,
        "eval/leader_length": sum(r[1] for r in rows) / n,
        "eval/follower_length": sum(r[2] for r in rows) / n,
        "eval/prompts": float(len(rows)),
    }
