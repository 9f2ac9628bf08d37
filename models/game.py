"""The tabular Stackelberg preference game (PAPER.md, "The game" and "StackelbergGDA").

One prompt, ``n`` answers, a preference matrix ``P[y, y'] = p(y ≻ y')`` with ``P + Pᵀ = 1``.
The Leader plays ``π`` (a distribution over answers), the Follower sees the realised ``y`` and
plays ``ω(·|y)`` (row ``y`` of an ``(n, n)`` matrix). The objective (paper eq. 5), which the
Leader maximises and the Follower minimises::

    J(π, ω) = Σ_y π(y) [ Σ_y' ω(y'|y) P[y, y'] + τF·KL(ω(·|y) ‖ ω_ref(·|y)) ] − τL·KL(π ‖ π_ref)

Closed form (the oracle, ``closed_form``)::

    ω*(y'|y) ∝ ω_ref(y'|y) · exp(−P[y, y'] / τF)      Z_F(y) its normaliser
    V(y)     = −τF · log Z_F(y)                        the Follower's value of answer y
    π*(y)    ∝ π_ref(y) · exp(V(y) / τL)               value J* = τL · log Σ_y π_ref(y) e^{V(y)/τL}

computed in log space (log-sum-exp), so τ down to 1e-6 is fine.

Solvers:

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

The Condorcet example (``condorcet_preferences``) and refinement-chain reach probabilities
(``reach_probabilities``) reproduce the paper's 1/3, 2/3, 1 vs 1/3, 5/9, 19/27. Numpy only.

How to run::

    slhf game solve --preferences P.json --tau-leader 0.5 --tau-follower 0.5 [--method gda]
    slhf game condorcet --shares 0.4 0.35 0.25
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Tolerance on ``P[y][y'] + P[y'][y] = 1`` and on reference policies summing to 1.
SUM_TOLERANCE = 1e-6
#: Floor under the logs in gradients, so a policy entry projected to 0 gives a finite gradient.
LOG_FLOOR = 1e-12
#: The three annotator rankings of the Condorcet example (answers 0=A, 1=B, 2=C).
CONDORCET_RANKINGS = ((0, 1, 2), (1, 2, 0), (2, 0, 1))


class GameError(ValueError):
    """Invalid game input (preference matrix, temperatures, references); names the numbers."""


@dataclass(frozen=True)
class StackelbergSolution:
    """Leader policy ``(n,)``, Follower policy ``(n, n)`` (row y = ω(·|y)), objective value;
    iterative solvers also report their steps, final residual and whether it met the tolerance."""

    leader: np.ndarray
    follower: np.ndarray
    value: float
    steps: int | None = None
    residual: float | None = None
    converged: bool | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "leader": self.leader.tolist(),
            "follower": self.follower.tolist(),
            "value": float(self.value),
        }
        if self.steps is not None:
            out |= {"steps": self.steps, "residual": self.residual, "converged": self.converged}
        return out


# -- validation --------------------------------------------------------------------------------
def validate_preferences(preferences: object) -> np.ndarray:
    """Return ``P`` as a float array; raise ``GameError`` unless square, in [0, 1], P + Pᵀ = 1."""
    try:
        p = np.asarray(preferences, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GameError(f"preferences must be a list of lists of numbers ({e})") from None
    if p.ndim != 2 or p.shape[0] != p.shape[1] or p.shape[0] == 0:
        raise GameError(f"preferences must be a non-empty square matrix; got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise GameError("preferences must be finite numbers")
    bad = np.argwhere((p < 0) | (p > 1))
    if len(bad):
        i, j = bad[0]
        raise GameError(f"P[{i}][{j}] = {p[i, j]:g}, must be in [0, 1]")
    err = np.abs(p + p.T - 1.0)
    if err.max() > SUM_TOLERANCE:
        i, j = np.unravel_index(int(np.argmax(err)), err.shape)
        raise GameError(
            f"P[{i}][{j}] + P[{j}][{i}] = {p[i, j] + p[j, i]:g}, must be 1 (±{SUM_TOLERANCE:g})"
        )
    return p


def _check_tau(name: str, tau: float) -> None:
    if not (np.isfinite(tau) and tau > 0):
        raise GameError(f"{name} must be > 0 (the equilibrium is unique only then); got {tau}")


def _policy(name: str, ref: object | None, shape: tuple[int, ...]) -> np.ndarray:
    """A reference policy (uniform when None), validated: the shape, > 0, rows summing to 1."""
    if ref is None:
        return np.full(shape, 1.0 / shape[-1])
    r = np.asarray(ref, dtype=np.float64)
    if r.shape != shape:
        raise GameError(f"{name} must have shape {shape}; got {r.shape}")
    if not np.all(r > 0):
        raise GameError(f"{name} must be > 0 everywhere (min is {r.min():g})")
    sums = r.sum(axis=-1)
    if np.max(np.abs(sums - 1.0)) > SUM_TOLERANCE:
        raise GameError(f"{name} must sum to 1 (per row); sums are {np.round(sums, 9).tolist()}")
    return r


def _logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) along the last axis, with 0·log 0 = 0."""
    safe = np.where(p > 0, p, 1.0)
    return np.sum(np.where(p > 0, p * (np.log(safe) - np.log(q)), 0.0), axis=-1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation ½‖p − q‖₁; for matrices the largest over rows."""
    return float(np.max(0.5 * np.sum(np.abs(np.asarray(p) - np.asarray(q)), axis=-1)))


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row (last axis) onto the probability simplex.

    Sort-based (Held et al. 1974): with u sorted descending, ρ = max{j : u_j − (Σ_{i≤j} u_i − 1)/j
    > 0}, θ = (Σ_{i≤ρ} u_i − 1)/ρ, and the projection is max(v − θ, 0).
    """
    v = np.asarray(v, dtype=np.float64)
    u = -np.sort(-v, axis=-1)
    css = np.cumsum(u, axis=-1) - 1.0
    j = np.arange(1, v.shape[-1] + 1)
    rho = np.sum(u - css / j > 0, axis=-1, keepdims=True)  # ≥ 1 always
    theta = np.take_along_axis(css, rho - 1, axis=-1) / rho
    return np.maximum(v - theta, 0.0)


# -- the objective and its closed-form solution --------------------------------------------------
def stackelberg_objective(
    preferences: np.ndarray,
    leader: np.ndarray,
    follower: np.ndarray,
    tau_leader: float,
    tau_follower: float,
    leader_ref: np.ndarray | None = None,
    follower_ref: np.ndarray | None = None,
) -> float:
    """``J(π, ω)`` of the module docstring (eq. 5 for one prompt)."""
    p = np.asarray(preferences, dtype=np.float64)
    n = p.shape[0]
    pi_ref = _policy("leader_ref", leader_ref, (n,))
    omega_ref = _policy("follower_ref", follower_ref, (n, n))
    q = np.sum(follower * p, axis=1) + tau_follower * _kl(follower, omega_ref)
    return float(leader @ q - tau_leader * _kl(leader, pi_ref))


def closed_form(
    preferences: object,
    tau_leader: float,
    tau_follower: float,
    leader_ref: object | None = None,
    follower_ref: object | None = None,
) -> StackelbergSolution:
    """The unique Stackelberg equilibrium (Proposition 1) in closed form, in log space."""
    p = validate_preferences(preferences)
    _check_tau("tau_leader", tau_leader)
    _check_tau("tau_follower", tau_follower)
    n = p.shape[0]
    log_omega_ref = np.log(_policy("follower_ref", follower_ref, (n, n)))
    log_pi_ref = np.log(_policy("leader_ref", leader_ref, (n,)))
    follower_logits = log_omega_ref - p / tau_follower  # (n, n)
    log_z = _logsumexp(follower_logits, axis=1)  # (n,)
    follower = np.exp(follower_logits - log_z[:, None])
    v = -tau_follower * log_z  # Follower value V(y)
    leader_logits = log_pi_ref + v / tau_leader
    log_norm = _logsumexp(leader_logits)
    leader = np.exp(leader_logits - log_norm)
    return StackelbergSolution(leader, follower, float(tau_leader * log_norm))


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
    _check_tau("tau_leader", tau_leader)
    _check_tau("tau_follower", tau_follower)
    if not kappa > 0:
        raise GameError(f"kappa must be > 0 (ηF = κ·ηL); got {kappa}")
    if not lr_leader > 0:
        raise GameError(f"the Leader step size must be > 0; got {lr_leader}")
    if steps < 1:
        raise GameError(f"steps must be ≥ 1; got {steps}")
    n = p.shape[0]
    return p, _policy("leader_ref", leader_ref, (n,)), _policy("follower_ref", follower_ref, (n, n))


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
    _check_tau("tau", tau)
    log_ref = np.log(_policy("reference", reference, (p.shape[0],)))

    def prox(log_pi: np.ndarray, opponent: np.ndarray) -> np.ndarray:
        logits = (log_pi + lr * tau * log_ref + lr * (p @ opponent)) / (1.0 + lr * tau)
        return logits - _logsumexp(logits)

    log_pi = log_ref.copy()
    for _ in range(max_steps):
        half = prox(log_pi, np.exp(log_pi))
        new = prox(log_pi, np.exp(half))
        done = np.max(np.abs(np.exp(new) - np.exp(log_pi))) < tol
        log_pi = new
        if done:
            break
    return np.exp(log_pi)


# -- the Condorcet example and refinement chains ------------------------------------------------
def preferences_from_rankings(
    rankings: Sequence[Sequence[int]], shares: Sequence[float]
) -> np.ndarray:
    """``P[y, y']`` = share of annotators ranking y above y' (½ on the diagonal)."""
    if len(rankings) != len(shares):
        raise GameError(f"got {len(rankings)} rankings but {len(shares)} shares")
    s = np.asarray(shares, dtype=np.float64)
    if np.any(s < 0) or abs(s.sum() - 1.0) > SUM_TOLERANCE:
        raise GameError(f"shares must be ≥ 0 and sum to 1; got {s.tolist()} (sum {s.sum():g})")
    n = len(rankings[0])
    p = np.full((n, n), 0.5)
    for ranking, share in zip(rankings, s, strict=True):
        position = {answer: k for k, answer in enumerate(ranking)}
        for y in range(n):
            for y2 in range(n):
                if y != y2:
                    p[y, y2] += share * ((position[y] < position[y2]) - 0.5)
    return p


def condorcet_preferences(shares: Sequence[float] = (1 / 3, 1 / 3, 1 / 3)) -> np.ndarray:
    """P for rankings A≻B≻C, B≻C≻A, C≻A≻B with the given shares (α1, α2, α3)."""
    return preferences_from_rankings(CONDORCET_RANKINGS, shares)


def resampling_kernel(policy: np.ndarray) -> np.ndarray:
    """The "Follower" of i.i.d. resampling: every row is ``policy``."""
    return np.tile(np.asarray(policy, dtype=np.float64), (len(policy), 1))


def reach_probabilities(
    leader: np.ndarray,
    follower: np.ndarray,
    favourites: Sequence[int],
    shares: Sequence[float],
    rounds: int,
) -> np.ndarray:
    """``out[k-1]`` = P(a user has seen their favourite among the first k answers), k = 1..rounds.

    The chain: answer 1 ~ ``leader``, answer i+1 ~ ``follower[answer i]`` (the Follower sees only
    the previous answer). A user of type t (share ``shares[t]``) has favourite ``favourites[t]``;
    the result is the share-weighted average over types, computed exactly by propagating the
    probability mass that has not yet hit the favourite.
    """
    leader, follower = np.asarray(leader, float), np.asarray(follower, float)
    out = np.zeros(rounds)
    for fav, share in zip(favourites, shares, strict=True):
        keep = np.ones(len(leader))
        keep[fav] = 0.0
        missed = leader * keep  # mass over non-favourite answers, not yet reached
        for k in range(rounds):
            out[k] += share * (1.0 - missed.sum())
            missed = (missed @ follower) * keep
    return out
