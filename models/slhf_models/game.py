"""The tabular Stackelberg preference game and its closed-form equilibrium (docs/algorithm.md).

One prompt, ``n`` answers, a preference matrix ``P[y, y'] = p(y ≻ y')`` with ``P + Pᵀ = 1``.
The Leader plays ``π`` (a distribution over answers), the Follower sees the realised ``y`` and
plays ``ω(·|y)`` (row ``y`` of an ``(n, n)`` matrix). The objective (the paper's eq. 5), which the
Leader maximises and the Follower minimises::

    J(π, ω) = Σ_y π(y) [ Σ_y' ω(y'|y) P[y, y'] + τF·KL(ω(·|y) ‖ ω_ref(·|y)) ] − τL·KL(π ‖ π_ref)

Closed form (the oracle, ``closed_form``)::

    ω*(y'|y) ∝ ω_ref(y'|y) · exp(−P[y, y'] / τF)      Z_F(y) its normaliser
    V(y)     = −τF · log Z_F(y)                        the Follower's value of answer y
    π*(y)    ∝ π_ref(y) · exp(V(y) / τL)               value J* = τL · log Σ_y π_ref(y) e^{V(y)/τL}

computed in log space (log-sum-exp), so τ down to 1e-6 is fine. The iterative solvers (Algorithm
1, a softmax variant, and the NLHF Nash equilibrium for comparison) are
models/slhf_models/game_solvers.py.

The Condorcet example (``condorcet_preferences``) and refinement-chain reach probabilities
(``reach_probabilities``) reproduce the paper's 1/3, 2/3, 1 vs 1/3, 5/9, 19/27. Numpy only.

How to run (models/slhf_models/game_cli.py)::

    slhf game solve --preferences P.json --tau-leader 0.5 --tau-follower 0.5 [--method gda]
    slhf game condorcet --shares 0.4 0.35 0.25
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Tolerance on ``P[y][y'] + P[y'][y] = 1`` and on reference policies summing to 1.
SUM_TOLERANCE = 1e-6
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


def check_tau(name: str, tau: float) -> None:
    """Raise ``GameError`` unless ``tau`` is finite and > 0."""
    if not (np.isfinite(tau) and tau > 0):
        raise GameError(f"{name} must be > 0 (the equilibrium is unique only then); got {tau}")


def reference_policy(name: str, ref: object | None, shape: tuple[int, ...]) -> np.ndarray:
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


def logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) along the last axis, with 0·log 0 = 0."""
    safe = np.where(p > 0, p, 1.0)
    return np.sum(np.where(p > 0, p * (np.log(safe) - np.log(q)), 0.0), axis=-1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation ½‖p − q‖₁; for matrices the largest over rows."""
    return float(np.max(0.5 * np.sum(np.abs(np.asarray(p) - np.asarray(q)), axis=-1)))


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
    pi_ref = reference_policy("leader_ref", leader_ref, (n,))
    omega_ref = reference_policy("follower_ref", follower_ref, (n, n))
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
    check_tau("tau_leader", tau_leader)
    check_tau("tau_follower", tau_follower)
    n = p.shape[0]
    log_omega_ref = np.log(reference_policy("follower_ref", follower_ref, (n, n)))
    log_pi_ref = np.log(reference_policy("leader_ref", leader_ref, (n,)))
    follower_logits = log_omega_ref - p / tau_follower  # (n, n)
    log_z = logsumexp(follower_logits, axis=1)  # (n,)
    follower = np.exp(follower_logits - log_z[:, None])
    v = -tau_follower * log_z  # Follower value V(y)
    leader_logits = log_pi_ref + v / tau_leader
    log_norm = logsumexp(leader_logits)
    leader = np.exp(leader_logits - log_norm)
    return StackelbergSolution(leader, follower, float(tau_leader * log_norm))


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
