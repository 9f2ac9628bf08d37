"""Algorithm 2 losses (models/slhf_models/trainer/objective.py), checked against values worked out
by hand."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from slhf_models.trainer.objective import (
    ObjectiveParams,
    RoleRollout,
    advantages,
    kl_per_token,
    kl_to_go,
    leader_scores,
    missing_eos,
    reinforce_loss,
    role_loss,
    role_scores,
    sequence_kl,
)

LOG2 = math.log(2.0)


def log(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def rollout(logprobs: torch.Tensor, ref: torch.Tensor, mask=None, missing=None) -> RoleRollout:  # type: ignore[no-untyped-def]
    lp = logprobs.clone().requires_grad_(True)
    mask = torch.ones_like(lp) if mask is None else mask
    missing = torch.zeros(lp.shape[0], dtype=torch.bool) if missing is None else missing
    return RoleRollout(lp, ref, mask, missing)


def combined(
    leader: RoleRollout,
    follower: RoleRollout,
    p: torch.Tensor,
    *,
    kappa: float,
    update_leader: bool = True,
    **settings: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_L + κ·L_F`` of shared weights as the trainer composes it (role_losses.py): each role's
    ``role_loss``, the Leader's with the Follower's sequence KL."""
    params = ObjectiveParams(**settings)
    loss_l, stats_l = role_loss(
        "leader", leader, p, params, sequence_kl(follower, params.estimator)
    )
    loss_f, stats_f = role_loss("follower", follower, p, params)
    total = kappa * loss_f + (loss_l if update_leader else 0.0)
    stats = {f"leader/{k}": v for k, v in stats_l.items()}
    stats |= {f"follower/{k}": v for k, v in stats_f.items()}
    stats["preference"] = p.float().mean()
    return total, stats


@pytest.mark.parametrize(
    "estimator, expected",
    [
        # r = π/π_ref = 0.5/0.25 = 2, then r = 1, then r = 0.25/0.5 = ½
        ("k1", [LOG2, 0.0, -LOG2]),  # log r
        ("k3", [0.5 - 1 + LOG2, 0.0, 2 - 1 - LOG2]),  # r⁻¹ − 1 + log r = 0.19315, 0.30685
    ],
)
def test_kl_estimators_per_token(estimator: str, expected: list[float]) -> None:
    got = kl_per_token(log(0.5, 0.3, 0.25)[None], log(0.25, 0.3, 0.5)[None], estimator)  # type: ignore[arg-type]
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))


def test_unknown_estimator_and_baseline_are_errors() -> None:
    with pytest.raises(ValueError, match="'k1' or 'k3'; got 'k2'"):
        kl_per_token(log(0.5), log(0.5), "k2")  # type: ignore[arg-type]  # removed: mean ≠ KL
    with pytest.raises(ValueError, match="'constant' or 'leave_one_out'"):
        advantages(torch.tensor([0.5]), "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch of ≥ 2"):
        advantages(torch.tensor([0.5]), "leave_one_out")


def test_missing_eos_ignores_padding() -> None:
    ids = torch.tensor([[5, 2, 0], [5, 5, 2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the second EOS lies in the padding
    assert missing_eos(ids, mask, eos_token_id=2).tolist() == [False, True]


def test_scores_and_baselines() -> None:
    p, missing = torch.tensor([0.8, 0.3]), torch.tensor([False, True])
    # Leader p − c·1[no EOS] = (0.8, 0.3 − 1); Follower (1 − p) − c·1[…] = (0.2, 0.7 − 1)
    torch.testing.assert_close(role_scores(p, missing, "leader", 1.0), torch.tensor([0.8, -0.7]))
    torch.testing.assert_close(role_scores(p, missing, "follower", 1.0), torch.tensor([0.2, -0.3]))
    s = torch.tensor([0.9, 0.5, 0.1])
    torch.testing.assert_close(advantages(s, "constant"), torch.tensor([0.4, 0.0, -0.4]))
    # leave-one-out: 0.9 − mean(0.5, 0.1) = 0.6, 0.5 − mean(0.9, 0.1) = 0, 0.1 − 0.7 = −0.6
    torch.testing.assert_close(advantages(s, "leave_one_out"), torch.tensor([0.6, 0.0, -0.6]))


def test_reinforce_loss_sums_tokens_and_averages_the_batch() -> None:
    # B = 2, T = 2, answer 2 has one padding token; τ = 0.1, k1, advantages (0.3, −0.2).
    # δ = [[log 2, 0], [0, ·]], coef = τδ − A = [[0.1·log 2 − 0.3, −0.3], [0.2, 0]]
    #     = [[−0.230685, −0.3], [0.2, 0]]
    # loss = ½ (−0.230685·log ½ + (−0.3)·log ¼ + 0.2·log ½) = ½ (0.159899 + 0.415888 − 0.138629)
    #      = 0.218579
    lp = torch.stack([log(0.5, 0.25), log(0.5, 0.9)])
    ref = torch.stack([log(0.25, 0.25), log(0.5, 0.1)])
    r = rollout(lp, ref, mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    loss, stats = reinforce_loss(r, torch.tensor([0.3, -0.2], dtype=torch.float64), 0.1, "k1")
    assert loss.item() == pytest.approx(0.2185788625, abs=1e-9)
    assert stats["sequence_kl"].item() == pytest.approx(LOG2 / 2)  # per-answer KL sums: log 2 and 0
    assert stats["length"].item() == 1.5
    assert not any(v.requires_grad for v in stats.values())
    # gradient wrt log π = mask · coef / B
    loss.backward()
    expected = torch.tensor([[0.1 * LOG2 - 0.3, -0.3], [0.2, 0.0]], dtype=torch.float64) / 2
    torch.testing.assert_close(r.logprobs.grad, expected)


def test_delta_is_detached_even_when_the_reference_is_the_policy() -> None:
    # k3 depends on log π; detaching δ keeps the gradient at (τδ − A)/B with δ = 0 here
    lp = log(0.5)[None]
    r = rollout(lp, lp.clone(), missing=torch.tensor([False]))
    loss, _ = reinforce_loss(r, torch.tensor([0.25], dtype=torch.float64), 1.0, "k3")
    loss.backward()
    torch.testing.assert_close(r.logprobs.grad, torch.tensor([[-0.25]], dtype=torch.float64))


def test_stackelberg_loss_is_leader_plus_kappa_follower() -> None:
    # One token per answer, δ = 0 (policy = reference), p = (0.8, 0.3), constant baseline.
    # Leader: log π = log ½, A_L = (0.3, −0.2): L_L = ½(−0.3·log ½ + 0.2·log ½) = 0.034657
    # Follower: log π = log ¼, A_F = (0.2 − ½, 0.7 − ½) = (−0.3, 0.2):
    #   L_F = ½(0.3·log ¼ − 0.2·log ¼) = −0.069315;  total = L_L + 5·L_F = −0.311916
    lead_lp, foll_lp = log(0.5, 0.5)[:, None], log(0.25, 0.25)[:, None]
    leader, follower = rollout(lead_lp, lead_lp.clone()), rollout(foll_lp, foll_lp.clone())
    p = torch.tensor([0.8, 0.3], dtype=torch.float64)
    kw = {"tau_leader": 1e-3, "tau_follower": 1e-3, "kappa": 5.0}
    total, stats = combined(leader, follower, p, **kw)  # type: ignore[arg-type]
    assert stats["leader/loss"].item() == pytest.approx(0.0346573590, abs=1e-9)
    assert stats["follower/loss"].item() == pytest.approx(-0.0693147181, abs=1e-9)
    assert total.item() == pytest.approx(0.0346573590 - 5 * 0.0693147181, abs=1e-9)
    assert stats["preference"].item() == pytest.approx(0.55)
    total.backward()
    # ∂total/∂log π' = κ·(−A_F)/B = 5·(0.3, −0.2)/2
    torch.testing.assert_close(follower.logprobs.grad, torch.tensor([[0.75], [-0.5]]).double())
    torch.testing.assert_close(leader.logprobs.grad, torch.tensor([[-0.15], [0.1]]).double())


def test_leader_skipped_and_missing_eos_penalised() -> None:
    # update_leader=False: only κ·L_F. The Follower's second answer has no EOS, c = 1:
    # A_F = ((1 − 0.8) − ½, (1 − 0.3) − ½ − 1) = (−0.3, −0.8); L_F = ½(0.3 + 0.8)·log ¼
    lead_lp, foll_lp = log(0.5, 0.5)[:, None], log(0.25, 0.25)[:, None]
    leader = rollout(lead_lp, lead_lp.clone())
    follower = rollout(foll_lp, foll_lp.clone(), missing=torch.tensor([False, True]))
    p = torch.tensor([0.8, 0.3], dtype=torch.float64)
    total, stats = combined(
        leader, follower, p, tau_leader=0.1, tau_follower=0.1, kappa=2.0,
        missing_eos_penalty=1.0, update_leader=False,
    )  # fmt: skip
    assert total.item() == pytest.approx(2 * 0.5 * 1.1 * math.log(0.25))
    assert stats["follower/missing_eos"].item() == 0.5
    total.backward()
    assert leader.logprobs.grad is None  # the Leader is not in the graph


def test_leave_one_out_baseline_in_the_combined_loss() -> None:
    # p = (0.8, 0.3, 0.4): Leader LOO advantages 0.8 − 0.35 = 0.45, 0.3 − 0.6 = −0.3,
    # 0.4 − 0.55 = −0.15; with log π = log ½ and δ = 0: L_L = ⅓ Σ −A·log ½ = 0 (Σ A = 0)
    lp = log(0.5, 0.5, 0.5)[:, None]
    leader, follower = rollout(lp, lp.clone()), rollout(lp, lp.clone())
    p = torch.tensor([0.8, 0.3, 0.4], dtype=torch.float64)
    total, stats = combined(
        leader, follower, p, tau_leader=0.1, tau_follower=0.1, kappa=1.0, baseline="leave_one_out"
    )
    assert stats["leader/loss"].item() == pytest.approx(0.0, abs=1e-12)
    total.backward()
    expected = -torch.tensor([[0.45], [-0.3], [-0.15]], dtype=torch.float64) / 3
    torch.testing.assert_close(leader.logprobs.grad, expected)


def test_kl_to_go_sums_the_current_and_later_tokens_only() -> None:
    # δ = (1, 2, 4 | padding): G = (1 + 2 + 4, 2 + 4, 4, 0); row 2 has T = 2 real tokens
    delta = torch.tensor([[1.0, 2.0, 4.0, 9.0], [3.0, 5.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(
        kl_to_go(delta, mask), torch.tensor([[7.0, 6.0, 4.0, 0.0], [8.0, 5.0, 0.0, 0.0]])
    )


def test_two_token_answer_weights_the_first_token_by_the_kl_still_to_come() -> None:
    # B = 1, k1, τ = 0.1, A = 0.3: δ = (log 2, −log 2) → G = (0, −log 2);
    # ∂loss/∂log π = τ·G − A = (−0.3, −0.1·log 2 − 0.3)
    r = rollout(log(0.5, 0.25)[None], log(0.25, 0.5)[None])
    loss, stats = reinforce_loss(r, torch.tensor([0.3], dtype=torch.float64), 0.1, "k1")
    assert stats["sequence_kl"].item() == pytest.approx(0.0)
    loss.backward()
    expected = torch.tensor([[-0.3, -0.1 * LOG2 - 0.3]], dtype=torch.float64)
    torch.testing.assert_close(r.logprobs.grad, expected)


def test_k3_adds_its_own_gradient_to_the_reinforce_term() -> None:
    # one token, π = ½, π_ref = ¼ (r = 2), τ = 1, A = 0: REINFORCE coef τ·k3 = ½ − 1 + log 2;
    # ∂k3/∂log π = 1 − r⁻¹ = ½; total ∂loss/∂log π = log 2 − ½ + ½ = log 2
    r = rollout(log(0.5)[None], log(0.25)[None])
    loss, _ = reinforce_loss(r, torch.tensor([0.0], dtype=torch.float64), 1.0, "k3")
    loss.backward()
    torch.testing.assert_close(r.logprobs.grad, torch.tensor([[LOG2]], dtype=torch.float64))


def test_full_leader_objective_adds_tau_f_times_the_followers_kl() -> None:
    # Follower answers: KL estimates Σ_t k1 = log 2 (answer 1) and 0 (answer 2); τF = 0.5, p = 0.6
    lead = rollout(log(0.5, 0.5)[:, None], log(0.5, 0.5)[:, None])
    foll = rollout(log(0.5, 0.3)[:, None], log(0.25, 0.3)[:, None])
    p = torch.tensor([0.6, 0.6], dtype=torch.float64)
    kl = sequence_kl(foll, "k1")
    torch.testing.assert_close(kl, torch.tensor([LOG2, 0.0], dtype=torch.float64))
    full = leader_scores(p, lead.missing_eos, kl, tau_follower=0.5, objective="full")
    torch.testing.assert_close(full, torch.tensor([0.6 + 0.5 * LOG2, 0.6], dtype=torch.float64))
    paper = leader_scores(p, lead.missing_eos, kl, tau_follower=0.5, objective="paper")
    torch.testing.assert_close(paper, p)
    _, stats = combined(
        lead, foll, p, tau_leader=0.1, tau_follower=0.5, kappa=1.0, leader_objective="full"
    )
    assert stats["leader/advantage"].item() == pytest.approx(0.1 + 0.25 * LOG2)
    with pytest.raises(ValueError, match="'full' or 'paper'; got 'nash'"):
        leader_scores(p, lead.missing_eos, kl, tau_follower=0.5, objective="nash")  # type: ignore[arg-type]


def test_entropy_stat_is_the_mean_over_answer_tokens() -> None:
    lp = log(0.5, 0.5)[None]
    r = RoleRollout(
        lp, lp, torch.tensor([[1.0, 0.0]]), torch.tensor([False]), torch.tensor([[0.7, 9.0]])
    )
    _, stats = reinforce_loss(r, torch.tensor([0.0], dtype=torch.float64), 0.1, "k1")
    assert stats["entropy"].item() == pytest.approx(0.7)  # the padded position is ignored
