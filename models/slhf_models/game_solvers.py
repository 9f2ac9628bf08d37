"""Iterative solvers of the tabular Stackelberg game (models/slhf_models/game.py;
docs/algorithm.md).

- ``stackelberg_gda``: Algorithm 1, simultaneous projected gradient ascent (Leader) / descent
  (Follower) with ``ηF = κ·ηL``, iterated until its own fixed-point residual is below ``tol``.
  Departures: (1) the Follower's gradient for row ``y`` is taken per realised answer (not
  weighted by ``π(y)``), so rows the Leader rarely plays still converge; the fixed point is the
  same. (2) The step adapts to τ: the KL term's curvature at entry ``i`` is ``τ/x_i``, so a
  single Euclidean step is stable only when ``η·τ/min(x) ≲ 1``, which at τ ≤ 0.1 (entries of
  1e-9) stalls any fixed step (it ended up to 0.06 total variation from the closed form). Each
  entry moves by ``η_i·(g_i − θ)`` with ``η_i = c·x_i/τ`` (c = ``lr_leader``, κ·c for the
  Follower, both halved on a step that would leave the simplex) and ``θ`` keeping the sum at 1.
  The fixed points are Algorithm 1's (``g_i`` equal on the support: the equilibrium). The
  residual is ``max(‖Δπ‖₁, max_y ‖Δω(·|y)‖₁) / c`` per step; ``converged`` says whether it fell
  below ``tol`` within ``max_steps``.
- ``softmax_policy_gradient``: the same two-timescale game with softmax logits; gradients stay
  bounded near the boundary, so it tolerates smaller τ at the price of more steps.
- ``nash_equilibrium``: the regularised NLHF equilibrium of the symmetric game
  ``max_π min_π' πᵀPπ' − τKL(π‖ref) + τKL(π'‖ref)``, by mirror-prox (extragradient with the KL
  prox in closed form). Its unique solution satisfies ``π ∝ ref · exp(Pπ / τ)``.

``closed_form`` (models/slhf_models/game.py) is the oracle they are checked against. Numpy only.
"""

from __future__ import annotations

import numpy as np

from slhf_models.game import (
    GameError,
    StackelbergSolution,
    check_tau,
    logsumexp,
    reference_policy,
    stackelberg_objective,
    validate_preferences,
)

#: Floor under the logs in gradients, so a policy entry projected to 0 gives a finite gradient.
LOG_FLOOR = 1e-12


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# -- Algorithm 1 and the softmax variant ------------------------------------------------------
def _gradients(
    p: np.ndarray,
    leader: np.ndarray,
    follower: np.ndarray,
    taus: tuple[float, float],
    refs: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """(∂J/∂π, per-row ∂J/∂ω(·|y)) at (π, ω); the Leader ascends, the Follower descends."""
    tau_l, tau_f = taus
    pi_ref, omega_ref = refs
    log_ratio_f = np.log(np.maximum(follower, LOG_FLOOR)) - np.log(omega_ref)
    q = np.sum(follower * p, axis=1) + tau_f * np.sum(follower * log_ratio_f, axis=1)
    log_ratio_l = np.log(np.maximum(leader, LOG_FLOOR)) - np.log(pi_ref)
    grad_leader = q - tau_l * (log_ratio_l + 1.0)
    grad_follower = p + tau_f * (log_ratio_f + 1.0)
    return grad_leader, grad_follower


def _setup(
    preferences: object,
    tau_leader: float,
    tau_follower: float,
    kappa: float,
    lr_leader: float,
    steps: int,
    leader_ref: object | None,
    follower_ref: object | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = validate_preferences(preferences)
    check_tau("tau_leader", tau_leader)
    check_tau("tau_follower", tau_follower)
    if not kappa > 0:
        raise GameError(f"kappa must be > 0 (ηF = κ·ηL); got {kappa}")
    if not lr_leader > 0:
        raise GameError(f"the Leader step size must be > 0; got {lr_leader}")
    if steps < 1:
        raise GameError(f"steps must be ≥ 1; got {steps}")
    n = p.shape[0]
    return (
        p,
        reference_policy("leader_ref", leader_ref, (n,)),
        reference_policy("follower_ref", follower_ref, (n, n)),
    )


def _adaptive_step(
    x: np.ndarray, grad: np.ndarray, tau: float, scale: float
) -> tuple[np.ndarray, float]:
    """One step ``x_i + η_i·(g_i − θ)``, ``η_i = scale·x_i/τ``, θ so each row keeps sum 1.

    The scale is halved until every entry stays positive; returns the new x and the scale used.
    """
    weights = x / tau  # η_i / scale
    theta = np.sum(weights * grad, axis=-1, keepdims=True) / np.sum(weights, -1, keepdims=True)
    move = weights * (grad - theta)
    while scale > 1e-12:
        new = x + scale * move
        if np.all(new > 0):
            return new / new.sum(axis=-1, keepdims=True), scale
        scale /= 2
    return x, 0.0


def stackelberg_gda(
    preferences: object,
    tau_leader: float,
    tau_follower: float,
    *,
    kappa: float = 5.0,
    lr_leader: float = 0.05,
    tol: float = 1e-9,
    max_steps: int = 100_000,
    leader_ref: object | None = None,
    follower_ref: object | None = None,
) -> StackelbergSolution:
    """Algorithm 1: two-timescale GDA from the references, steps adapted to τ (module docstring),
    until the fixed-point residual is below ``tol`` or ``max_steps`` have run."""
    p, pi_ref, omega_ref = _setup(
        preferences, tau_leader, tau_follower, kappa, lr_leader, max_steps, leader_ref, follower_ref
    )
    if not tol > 0:
        raise GameError(f"tol must be > 0; got {tol}")
    leader, follower = pi_ref.copy(), omega_ref.copy()
    scale_f = min(kappa * lr_leader, 0.5)  # ηF = κ·ηL, capped where a step overshoots anyway
    scale_l = scale_f / kappa
    residual, steps = np.inf, 0
    while steps < max_steps and not residual < tol:
        steps += 1
        g_l, g_f = _gradients(p, leader, follower, (tau_leader, tau_follower), (pi_ref, omega_ref))
        new_l, used_l = _adaptive_step(leader, g_l, tau_leader, scale_l)
        new_f, used_f = _adaptive_step(follower, -g_f, tau_follower, scale_f)
        residual = np.inf  # a step that could not move without leaving the simplex
        if used_l > 0 and used_f > 0:
            residual = max(
                np.abs(new_l - leader).sum() / used_l,
                np.abs(new_f - follower).sum(axis=1).max() / used_f,
            )
        leader, follower = new_l, new_f
    value = stackelberg_objective(p, leader, follower, tau_leader, tau_follower, pi_ref, omega_ref)
    return StackelbergSolution(
        leader, follower, value, steps, float(residual), bool(residual < tol)
    )


def softmax_policy_gradient(
    preferences: object,
    tau_leader: float,
    tau_follower: float,
    *,
    kappa: float = 5.0,
    lr_leader: float = 0.2,
    steps: int = 3_000,
    leader_ref: object | None = None,
    follower_ref: object | None = None,
) -> StackelbergSolution:
    """Two-timescale GDA on softmax logits: ∂J/∂θ = π ⊙ (g − ⟨π, g⟩) for a gradient g in π."""
    p, pi_ref, omega_ref = _setup(
        preferences, tau_leader, tau_follower, kappa, lr_leader, steps, leader_ref, follower_ref
    )
    theta_l, theta_f = np.log(pi_ref), np.log(omega_ref)
    lr_follower = kappa * lr_leader
    for _ in range(steps):
        leader, follower = _softmax(theta_l), _softmax(theta_f)
        g_l, g_f = _gradients(p, leader, follower, (tau_leader, tau_follower), (pi_ref, omega_ref))
        theta_l = theta_l + lr_leader * leader * (g_l - leader @ g_l)
        theta_f = theta_f - lr_follower * follower * (
            g_f - np.sum(follower * g_f, 1, keepdims=True)
        )
    leader, follower = _softmax(theta_l), _softmax(theta_f)
    value = stackelberg_objective(p, leader, follower, tau_leader, tau_follower, pi_ref, omega_ref)
    return StackelbergSolution(leader, follower, value)


# -- NLHF for comparison ------------------------------------------------------------------------
def nash_equilibrium(
    preferences: object,
    tau: float,
    reference: object | None = None,
    *,
    lr: float = 0.5,
    max_steps: int = 200_000,
    tol: float = 1e-12,
) -> np.ndarray:
    """The regularised NLHF Nash equilibrium ``π ∝ ref·exp(Pπ/τ)`` by mirror-prox.

    Each half step is the KL-proximal step of the regularised game in closed form:
    ``log π' = (log π + ητ·log ref + η·P π_eval) / (1 + ητ) − const``. Converges linearly
    (the regularised operator is strongly monotone); stops when no entry moves more than ``tol``.
    """
    p = validate_preferences(preferences)
    check_tau("tau", tau)
    log_ref = np.log(reference_policy("reference", reference, (p.shape[0],)))

    def prox(log_pi: np.ndarray, opponent: np.ndarray) -> np.ndarray:
        logits = (log_pi + lr * tau * log_ref + lr * (p @ opponent)) / (1.0 + lr * tau)
        return logits - logsumexp(logits)

    log_pi = log_ref.copy()
    for _ in range(max_steps):
        half = prox(log_pi, np.exp(log_pi))
        new = prox(log_pi, np.exp(half))
        done = np.max(np.abs(np.exp(new) - np.exp(log_pi))) < tol
        log_pi = new
        if done:
            break
    return np.exp(log_pi)
