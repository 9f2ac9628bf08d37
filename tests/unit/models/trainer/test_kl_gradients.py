"""The KL penalty's expected gradient, computed exactly (no sampling) on small vocabularies.

A softmax policy over every answer of a tiny vocabulary (one token, or two tokens with the second
conditioned on the first). ``reinforce_terms`` is evaluated on *every* answer and weighted by the
answer's (detached) probability: that is the expected loss whose gradient a sampled batch
estimates. It must equal the gradient of ``−(E_π[R] − τ·KL(π ‖ π_ref))``, and gradient descent on it
must reach ``π* ∝ π_ref·exp(R/τ)`` (the KL-regularised optimum) for every estimator offered.
The two-token case is the check that decided the per-token weighting (docs/algorithm.md): the
KL still to come, not the token's own δ_t.
"""

from __future__ import annotations

import pytest
import torch

from slhf_models.trainer.objective import KL_ESTIMATORS, RoleRollout, kl_per_token, reinforce_terms

V = 4  # vocabulary size


def softmax_policy(
    theta1: torch.Tensor, theta2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every answer's per-token log-probabilities ``(N, T)`` and its probability ``(N,)``.

    One token: answers ``y`` (N = V). Two tokens: answers ``(y1, y2)`` in row-major order
    (N = V²), ``π(y2 | y1) = softmax(theta2[y1])``.
    """
    lp1 = torch.log_softmax(theta1, dim=-1)  # (V,)
    if theta2 is None:
        return lp1[:, None], lp1.exp()
    lp2 = torch.log_softmax(theta2, dim=-1)  # (V, V)
    logprobs = torch.stack([lp1[:, None].expand(V, V), lp2], dim=-1).reshape(V * V, 2)
    return logprobs, logprobs.sum(1).exp()


def expected_loss(
    theta1: torch.Tensor,
    theta2: torch.Tensor | None,
    ref: tuple[torch.Tensor, torch.Tensor | None],
    reward: torch.Tensor,
    tau: float,
    estimator: str,
    per_token_delta: bool = False,
) -> torch.Tensor:
    """``Σ_y π(y)·loss(y)``, π detached: the expectation of the sampled loss.

    ``per_token_delta`` is the old weighting ``Σ_t [τ·δ_t − A]·log π(y_t)``, for comparison.
    """
    logprobs, probs = softmax_policy(theta1, theta2)
    ref_logprobs, _ = softmax_policy(*ref)
    mask = torch.ones_like(logprobs)
    advantage = reward - 0.5
    if per_token_delta:
        delta = kl_per_token(logprobs.detach(), ref_logprobs, estimator)  # type: ignore[arg-type]
        terms = ((tau * delta - advantage[:, None]) * logprobs).sum(1)
    else:
        rollout = RoleRollout(logprobs, ref_logprobs, mask, torch.zeros(len(probs), dtype=bool))
        terms = reinforce_terms(rollout, advantage, tau, estimator)  # type: ignore[arg-type]
    return (probs.detach() * terms).sum()


def true_objective(theta1, theta2, ref, reward, tau):  # type: ignore[no-untyped-def]
    """``E_π[R] − τ·KL(π ‖ π_ref)`` over whole answers, exactly."""
    logprobs, probs = softmax_policy(theta1, theta2)
    ref_logprobs, _ = softmax_policy(*ref)
    kl = (probs * (logprobs.sum(1) - ref_logprobs.sum(1))).sum()
    return (probs * reward).sum() - tau * kl


def random_game(tokens: int, seed: int) -> tuple[tuple, tuple, torch.Tensor]:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(seed)

    def logits(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    theta = (logits(V), logits(V, V) if tokens == 2 else None)
    ref = (logits(V), logits(V, V) if tokens == 2 else None)
    reward = torch.rand(V**tokens, generator=g, dtype=torch.float64)
    return theta, ref, reward


def grads(fn, theta):  # type: ignore[no-untyped-def]
    params = [t.clone().requires_grad_(True) for t in theta if t is not None]
    full = (params[0], params[1] if len(params) > 1 else None)
    return torch.autograd.grad(fn(*full), params)


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_expected_gradient_is_the_gradient_of_the_kl_regularised_objective(
    estimator: str, tokens: int
) -> None:
    theta, ref, reward = random_game(tokens, seed=tokens)
    tau = 0.3
    got = grads(lambda a, b: expected_loss(a, b, ref, reward, tau, estimator), theta)
    want = grads(lambda a, b: -true_objective(a, b, ref, reward, tau), theta)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_weighting_each_token_by_its_own_delta_is_biased_for_two_tokens(estimator: str) -> None:
    # Why G_t (KL to go): the first token's score ∇log π(y1) must see the second token's KL too.
    theta, ref, reward = random_game(2, seed=2)
    tau = 0.3
    old = grads(lambda a, b: expected_loss(a, b, ref, reward, tau, estimator, True), theta)
    want = grads(lambda a, b: -true_objective(a, b, ref, reward, tau), theta)
    assert (old[0] - want[0]).abs().max() > 1e-2  # first token: biased
    if estimator == "k1":  # the last token has no KL to come: the two weightings agree there
        torch.testing.assert_close(old[1], want[1], atol=1e-12, rtol=1e-9)


def descend(theta, ref, reward, tau: float, estimator: str, steps: int, lr: float):  # type: ignore[no-untyped-def]
    params = [t.clone().requires_grad_(True) for t in theta if t is not None]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        full = (params[0], params[1] if len(params) > 1 else None)
        expected_loss(*full, ref, reward, tau, estimator).backward()
        opt.step()
    full = (params[0].detach(), params[1].detach() if len(params) > 1 else None)
    return softmax_policy(*full)[1]


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("tau", [0.5, 0.1])
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_descent_on_the_expected_loss_reaches_ref_times_exp_reward_over_tau(
    estimator: str, tau: float, tokens: int
) -> None:
    theta, ref, reward = random_game(tokens, seed=10 + tokens)
    ref_logprobs, _ = softmax_policy(*ref)
    target = torch.softmax(ref_logprobs.sum(1) + reward / tau, dim=0)  # π_ref·exp(R/τ)
    start = softmax_policy(*theta)[1]
    assert 0.5 * (start - target).abs().sum() > 0.2  # a real distance to cover
    final = descend(theta, ref, reward, tau, estimator, steps=3000, lr=2.0 / tau)
    assert 0.5 * (final - target).abs().sum() < 1e-3
