"""Losses of StackelbergGDA for LLMs (PAPER.md, Algorithm 2), as pure functions.

Per prompt ``x_b``: a Leader answer ``y_b``, a Follower answer ``y'_b`` (conditioned on ``x_b``
and ``y_b``) and one preference ``p_b = p(y_b ≻ y'_b | x_b)``. With ``r = π_θ / π_ref`` per token
and ``δ_t`` one of Schulman's KL estimators (detached)::

    k1 = log r      k2 = ½ (log r)²      k3 = r⁻¹ − 1 + log r

    L_L = mean_b Σ_t [τL·δ_t − A_L,b] · log π_θ(y_b,t  | T_L(x_b))
    L_F = mean_b Σ_t [τF·δ_t − A_F,b] · log π_θ(y'_b,t | T_F(x_b, y_b))
    total = L_L + κ·L_F             (shared weights; separate weights: Follower lr = κ·η)

Advantages, with ``c`` the missing-EOS penalty and scores ``s_L = p − c·1[no EOS in y]``,
``s_F = (1 − p) − c·1[no EOS in y']``:

- ``"constant"`` baseline (the paper's runs): ``A = s − ½``, i.e. ``p − ½ − c·1[…]`` and
  ``(1 − p) − ½ − c·1[…]``.
- ``"leave_one_out"``: ``A_b = s_b − mean_{j≠b} s_j`` (the penalty enters the scores first).

Every function takes tensors and returns the loss and a dict of detached scalar stats (no
``.item()``, so nothing syncs a GPU). Tokens are ``(B, T)``; ``mask`` is 1 on answer tokens and
0 on padding; losses are summed over tokens and averaged over the batch. The gradient of a role
loss with respect to ``logprobs[b, t]`` is ``mask[b, t]·(τ·δ_t − A_b) / B``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from models.templates import Role

KLEstimator = Literal["k1", "k2", "k3"]
Baseline = Literal["constant", "leave_one_out"]
Stats = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoleRollout:
    """One role's sampled answers, scored by the policy and the frozen reference.

    Attributes:
        logprobs: ``(B, T)`` log π_θ of each answer token (with grad).
        ref_logprobs: ``(B, T)`` log π_ref of the same tokens, under the same role template.
        mask: ``(B, T)`` 1 on answer tokens, 0 on padding.
        missing_eos: ``(B,)`` True where the answer was cut off before EOS.
    """

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    mask: torch.Tensor
    missing_eos: torch.Tensor


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator
) -> torch.Tensor:
    """Schulman's estimator of KL(π_θ ‖ π_ref) per sampled token, ``(B, T)``."""
    log_r = logprobs - ref_logprobs  # log π_θ/π_ref
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(-log_r) + log_r  # r⁻¹ − 1 + log r, ≥ 0
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3'; got {estimator!r}")


def missing_eos(token_ids: torch.Tensor, mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(B,)`` True where no answer token (``mask`` = 1) is ``eos_token_id``."""
    return ~((token_ids == eos_token_id) & mask.bool()).any(dim=1)


def advantages(scores: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """``(B,)`` scores minus the baseline: ½, or the mean of the other scores in the batch."""
    if baseline == "constant":
        return scores - 0.5
    if baseline == "leave_one_out":
        n = scores.shape[0]
        if n < 2:
            raise ValueError("the leave_one_out baseline needs a batch of ≥ 2; got 1")
        return scores - (scores.sum() - scores) / (n - 1)
    raise ValueError(f"baseline must be 'constant' or 'leave_one_out'; got {baseline!r}")


def role_scores(
    preferences: torch.Tensor, missing: torch.Tensor, role: Role, missing_eos_penalty: float
) -> torch.Tensor:
    """``(B,)`` ``p − c·1[no EOS]`` for the Leader, ``(1 − p) − c·1[no EOS]`` for the Follower."""
    won = preferences if role == "leader" else 1.0 - preferences
    return won - missing_eos_penalty * missing.to(preferences.dtype)


def reinforce_loss(
    rollout: RoleRollout, advantage: torch.Tensor, tau: float, estimator: KLEstimator
) -> tuple[torch.Tensor, Stats]:
    """``mean_b Σ_t [τ·δ_t − A_b] · log π_θ(t)``; δ and A are detached."""
    mask = rollout.mask.to(rollout.logprobs.dtype)  # (B, T)
    delta = kl_per_token(rollout.logprobs.detach(), rollout.ref_logprobs.detach(), estimator)
    coef = (tau * delta - advantage.detach()[:, None]) * mask  # (B, T)
    loss = (coef * rollout.logprobs).sum(dim=1).mean()
    kl_seq = (delta * mask).sum(dim=1)  # (B,) KL estimate per answer
    stats = {
        "loss": loss.detach(),
        "advantage": advantage.detach().mean(),
        "kl": kl_seq.mean(),
        "length": mask.sum(dim=1).mean(),
        "missing_eos": rollout.missing_eos.float().mean(),
    }
    return loss, stats


def stackelberg_loss(
    leader: RoleRollout,
    follower: RoleRollout,
    preferences: torch.Tensor,
    *,
    tau_leader: float,
    tau_follower: float,
    kappa: float,
    estimator: KLEstimator = "k3",
    baseline: Baseline = "constant",
    missing_eos_penalty: float = 0.0,
    update_leader: bool = True,
) -> tuple[torch.Tensor, Stats]:
    """``L_L + κ·L_F`` for shared weights (``κ·L_F`` alone when ``update_leader`` is False).

    ``preferences`` is ``(B,)`` with ``p_b = p(y_b ≻ y'_b)`` in [0, 1]. The stats carry both
    roles' terms (``leader/…``, ``follower/…``) and ``preference`` (the Leader's mean win rate).
    With separate Leader/Follower weights call ``reinforce_loss`` per role instead.
    """
    scores_l = role_scores(preferences, leader.missing_eos, "leader", missing_eos_penalty)
    scores_f = role_scores(preferences, follower.missing_eos, "follower", missing_eos_penalty)
    loss_l, stats_l = reinforce_loss(leader, advantages(scores_l, baseline), tau_leader, estimator)
    loss_f, stats_f = reinforce_loss(
        follower, advantages(scores_f, baseline), tau_follower, estimator
    )
    total = kappa * loss_f + (loss_l if update_leader else 0.0)
    stats = {f"leader/{k}": v for k, v in stats_l.items()}
    stats |= {f"follower/{k}": v for k, v in stats_f.items()}
    stats["preference"] = preferences.detach().float().mean()
    stats["loss"] = total.detach()
    return total, stats
