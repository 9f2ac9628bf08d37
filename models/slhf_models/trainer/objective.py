"""Losses of StackelbergGDA for LLMs (docs/algorithm.md, Algorithm 2), as pure functions.

Per prompt ``x_b``: a Leader answer ``y_b``, a Follower answer ``y'_b`` (conditioned on ``x_b``
and ``y_b``) and one preference ``p_b = p(y_b ≻ y'_b | x_b)``. With ``r_t = π_θ / π_ref`` per
token and ``δ_t`` one of Schulman's KL estimators (docs/algorithm.md says why only these two)::

    k1 = log r        k3 = r⁻¹ − 1 + log r          (both have E_π[Σ_t δ_t] = KL(π ‖ π_ref))

    L_role = mean_b Σ_t [τ·G_b,t − A_b] · log π_θ(y_b,t)  (+ τ·Σ_t k3_t with grad, k3 only)
    G_b,t  = Σ_{t' ≥ t} δ_b,t'                         the KL still to come (detached)
    total  = L_L + κ·L_F        (shared weights; separate weights: Follower lr = κ·η)

Why this form: the gradient of ``E[A] − τ·KL(π ‖ π_ref)`` over whole answers weights each
token's score ``∇log π(y_t)`` by the KL of that token *and every later one* (earlier tokens are
fixed by then and average out). Weighting token t by its own δ_t alone is biased for answers
longer than one token. With k1 the REINFORCE term is the whole gradient; with k3 it misses
``E[∇k3]``, which the differentiable term adds back. Either way the expected gradient is the
KL's, so the KL-regularised fixed point is ``π ∝ π_ref·exp(A/τ)``
(tests/unit/models/trainer/test_kl_gradients.py
checks it exactly). k2 = ½(log r)² is not offered: its mean is not the KL.

Advantages, with ``c`` the missing-EOS penalty::

    s_L = p + τF·KL̂_F − c·1[no EOS in y]     (leader_objective "full": the Leader's value, eq. 5)
    s_L = p − c·1[no EOS in y]                (leader_objective "paper": Algorithm 2 as published)
    s_F = (1 − p) − c·1[no EOS in y']

``KL̂_F = Σ_t δ_t`` over the Follower's answer estimates ``KL(ω(·|x,y) ‖ ω_ref(·|x,y))``: the
Follower has to pay that KL to answer ``y``, so eq. 5 credits it to the Leader. Without it the
Leader's fixed point is ``π ∝ π_ref·exp(U/τL)`` with ``U(y) = E_ω*[p]``, not the equilibrium.

- ``"constant"`` baseline (the paper's runs): ``A = s − ½``.
- ``"leave_one_out"``: ``A_b = s_b − mean_{j≠b} s_j`` (the penalty enters the scores first).

Every function takes tensors and returns the loss and a dict of detached scalar stats (no
``.item()``, so nothing syncs a GPU). Tokens are ``(B, T)``; ``mask`` is 1 on answer tokens and
0 on padding; losses are summed over tokens and averaged over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slhf_models.serving.templates import Role

KLEstimator = Literal["k1", "k3"]
KL_ESTIMATORS: tuple[KLEstimator, ...] = ("k1", "k3")
Baseline = Literal["constant", "leave_one_out"]
LeaderObjective = Literal["full", "paper"]
Stats = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoleRollout:
    """One role's sampled answers, scored by the policy and the frozen reference.

    Attributes:
        logprobs: ``(B, T)`` log π_θ of each answer token (with grad).
        ref_logprobs: ``(B, T)`` log π_ref of the same tokens, under the same role template.
        mask: ``(B, T)`` 1 on answer tokens, 0 on padding.
        missing_eos: ``(B,)`` True where the answer was cut off before EOS.
        entropy: ``(B, T)`` entropy of π_θ at each answer position (detached), or None.
    """

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    mask: torch.Tensor
    missing_eos: torch.Tensor
    entropy: torch.Tensor | None = None


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator
) -> torch.Tensor:
    """Schulman's estimator of KL(π_θ ‖ π_ref) per sampled token, ``(B, T)``."""
    log_r = logprobs - ref_logprobs  # log π_θ/π_ref
    if estimator == "k1":
        return log_r
    if estimator == "k3":
        return torch.expm1(-log_r) + log_r  # r⁻¹ − 1 + log r, ≥ 0
    raise ValueError(f"kl estimator must be 'k1' or 'k3'; got {estimator!r}")


def kl_to_go(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` ``G_t = Σ_{t' ≥ t} δ_t'`` over answer tokens (0 on padding)."""
    masked = delta * mask
    return (masked.flip(1).cumsum(dim=1).flip(1)) * mask


def sequence_kl(rollout: RoleRollout, estimator: KLEstimator) -> torch.Tensor:
    """``(B,)`` detached ``Σ_t δ_t``: an unbiased estimate of each answer's KL to the reference."""
    delta = kl_per_token(rollout.logprobs.detach(), rollout.ref_logprobs.detach(), estimator)
    return (delta * rollout.mask.to(delta.dtype)).sum(dim=1)


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


def leader_scores(
    preferences: torch.Tensor,
    missing: torch.Tensor,
    follower_kl: torch.Tensor,
    *,
    tau_follower: float,
    objective: LeaderObjective,
    missing_eos_penalty: float = 0.0,
) -> torch.Tensor:
    """``(B,)`` the Leader's ``s_L``: with ``objective="full"`` plus ``τF·KL̂_F`` (eq. 5).

    ``follower_kl`` is ``sequence_kl`` of the Follower's answers (read only by ``"full"``).
    """
    scores = role_scores(preferences, missing, "leader", missing_eos_penalty)
    if objective == "full":
        return scores + tau_follower * follower_kl.detach().to(scores.dtype)
    if objective == "paper":
        return scores
    raise ValueError(f"leader_objective must be 'full' or 'paper'; got {objective!r}")


def reinforce_terms(
    rollout: RoleRollout, advantage: torch.Tensor, tau: float, estimator: KLEstimator
) -> torch.Tensor:
    """``(B,)`` per-answer loss ``Σ_t [τ·G_t − A]·log π(t)`` (+ ``τ·Σ_t k3_t`` for k3).

    Averaged over the batch it is ``reinforce_loss``; weighted by answer probabilities it is the
    exact expected loss (tests/unit/models/trainer/test_kl_gradients.py).
    """
    mask = rollout.mask.to(rollout.logprobs.dtype)  # (B, T)
    ref = rollout.ref_logprobs.detach()
    delta = kl_per_token(rollout.logprobs.detach(), ref, estimator)  # (B, T)
    coef = (tau * kl_to_go(delta, mask) - advantage.detach()[:, None]) * mask  # (B, T)
    per_answer = (coef * rollout.logprobs).sum(dim=1)
    if estimator == "k3":  # E[∇k3] = ∇KL − E[k3·∇log π]: the part REINFORCE does not see
        per_answer = per_answer + tau * (kl_per_token(rollout.logprobs, ref, "k3") * mask).sum(1)
    return per_answer


def reinforce_loss(
    rollout: RoleRollout, advantage: torch.Tensor, tau: float, estimator: KLEstimator
) -> tuple[torch.Tensor, Stats]:
    """``mean_b`` of ``reinforce_terms``; δ and A are detached."""
    mask = rollout.mask.to(rollout.logprobs.dtype)  # (B, T)
    loss = reinforce_terms(rollout, advantage, tau, estimator).mean()
    lengths = mask.sum(dim=1)  # (B,)
    stats = {
        "loss": loss.detach(),
        "advantage": advantage.detach().mean(),
        "sequence_kl": sequence_kl(rollout, estimator).mean(),  # Σ_t δ_t, mean over answers
        "length": lengths.mean(),
        "missing_eos": rollout.missing_eos.float().mean(),
    }
    if rollout.entropy is not None:  # mean per-token entropy over answer tokens
        tokens = lengths.sum().clamp(min=1.0)
        stats["entropy"] = (rollout.entropy.detach() * mask).sum() / tokens
    return loss, stats


@dataclass(frozen=True)
class ObjectiveParams:
    """The objective's hyper-parameters of both roles (a run's ``StackelbergConfig`` holds them)."""

    tau_leader: float
    tau_follower: float
    estimator: KLEstimator = "k1"
    baseline: Baseline = "constant"
    leader_objective: LeaderObjective = "full"
    missing_eos_penalty: float = 0.0


def role_loss(
    role: Role,
    rollout: RoleRollout,
    preferences: torch.Tensor,
    params: ObjectiveParams,
    follower_kl: torch.Tensor | None = None,
    advantage: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """``L_role`` of one role: its scores (``s_L`` or ``s_F``), their advantages under the
    baseline, and ``reinforce_loss`` with the role's τ; the stats are ``reinforce_loss``'s.

    ``follower_kl`` (``sequence_kl`` of the Follower's answers) is read for the Leader only, and
    needed only with ``leader_objective="full"``. ``advantage``, when given, is the role's
    advantage already computed over a larger batch (the leave-one-out baseline of a step split
    into micro-batches: ``role_advantages``); scores and baseline are then not recomputed here.
    """
    s = params
    if advantage is not None:
        tau = s.tau_leader if role == "leader" else s.tau_follower
        return reinforce_loss(rollout, advantage, tau, s.estimator)
    if role == "follower":
        scores = role_scores(preferences, rollout.missing_eos, "follower", s.missing_eos_penalty)
        return reinforce_loss(rollout, advantages(scores, s.baseline), s.tau_follower, s.estimator)
    if follower_kl is None:
        if s.leader_objective == "full":
            raise ValueError("the Leader's loss with leader_objective 'full' needs follower_kl")
        follower_kl = torch.zeros_like(preferences)
    scores = leader_scores(
        preferences,
        rollout.missing_eos,
        follower_kl,
        tau_follower=s.tau_follower,
        objective=s.leader_objective,
        missing_eos_penalty=s.missing_eos_penalty,
    )
    return reinforce_loss(rollout, advantages(scores, s.baseline), s.tau_leader, s.estimator)


def role_advantages(
    role: Role,
    preferences: torch.Tensor,
    missing: torch.Tensor,
    params: ObjectiveParams,
    follower_kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B,)`` the role's advantages over the whole batch (what ``role_loss`` computes from its
    own rows), for a step whose micro-batches must share one baseline."""
    if role == "follower":
        scores = role_scores(preferences, missing, "follower", params.missing_eos_penalty)
    else:
        if follower_kl is None:
            if params.leader_objective == "full":
                raise ValueError(
                    "leader_objective 'full': the Leader's advantages need follower_kl"
                )
            follower_kl = torch.zeros_like(preferences)
        scores = leader_scores(
            preferences,
            missing,
            follower_kl,
            tau_follower=params.tau_follower,
            objective=params.leader_objective,
            missing_eos_penalty=params.missing_eos_penalty,
        )
    return advantages(scores, params.baseline)
