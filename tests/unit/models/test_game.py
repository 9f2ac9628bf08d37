"""Tabular Stackelberg game (models/slhf_models/game.py) and ``slhf game`` (docs/algorithm.md, "The
game")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slhf.cli import main
from slhf_models.game import (
    GameError,
    closed_form,
    condorcet_preferences,
    reach_probabilities,
    resampling_kernel,
    stackelberg_objective,
    total_variation,
    validate_preferences,
)
from slhf_models.game_solvers import (
    nash_equilibrium,
    softmax_policy_gradient,
    stackelberg_gda,
)

UNIFORM3 = np.full(3, 1 / 3)


def random_preferences(n: int, seed: int) -> np.ndarray:
    """Random P with P + Pᵀ = 1: upper triangle uniform in [0, 1], lower = 1 − upper, ½ diag."""
    upper = np.triu(np.random.default_rng(seed).uniform(size=(n, n)), 1)
    return upper + np.tril(1.0 - upper.T, -1) + 0.5 * np.eye(n)


# -- inputs -----------------------------------------------------------------------------------
def test_condorcet_matrix_counts_the_shares_preferring_each_answer() -> None:
    # rankings A≻B≻C (α1), B≻C≻A (α2), C≻A≻B (α3): A≻B for types 1 and 3 -> α1 + α3, etc.
    p = condorcet_preferences((0.5, 0.3, 0.2))
    expected = [[0.5, 0.7, 0.5], [0.3, 0.5, 0.8], [0.5, 0.2, 0.5]]
    np.testing.assert_allclose(p, expected)


@pytest.mark.parametrize(
    "matrix, fragment",
    [
        ([[0.5, 0.5]], "square matrix; got shape (1, 2)"),
        ([[0.5, 1.2], [-0.2, 0.5]], "P[0][1] = 1.2, must be in [0, 1]"),
        ([[0.5, 0.7], [0.6, 0.5]], "P[0][1] + P[1][0] = 1.3, must be 1 (±1e-06)"),
        ([[0.4, 0.5], [0.5, 0.5]], "P[0][0] + P[0][0] = 0.8, must be 1"),
        ([["a"]], "list of lists of numbers"),
    ],
)
def test_invalid_preferences_are_rejected_with_the_numbers(matrix: object, fragment: str) -> None:
    with pytest.raises(GameError) as e:
        validate_preferences(matrix)
    assert fragment in str(e.value)


def test_sum_tolerance_is_one_in_a_million() -> None:
    validate_preferences([[0.5, 0.7 + 5e-7], [0.3, 0.5]])
    with pytest.raises(GameError):
        validate_preferences([[0.5, 0.7 + 2e-6], [0.3, 0.5]])


# -- closed form ------------------------------------------------------------------------------
def test_closed_form_on_a_two_answer_game_by_hand() -> None:
    # P = [[½, 0.8], [0.2, ½]], τL = τF = 1, uniform references.
    # Row 0: Z = ½(e^-0.5 + e^-0.8); row 1: Z = ½(e^-0.2 + e^-0.5); V = −log Z.
    p = [[0.5, 0.8], [0.2, 0.5]]
    z0, z1 = 0.5 * (np.exp(-0.5) + np.exp(-0.8)), 0.5 * (np.exp(-0.2) + np.exp(-0.5))
    sol = closed_form(p, 1.0, 1.0)
    np.testing.assert_allclose(sol.follower[0], [np.exp(-0.5), np.exp(-0.8)] / (2 * z0))
    np.testing.assert_allclose(sol.leader, np.array([1 / z0, 1 / z1]) / (1 / z0 + 1 / z1))
    assert sol.value == pytest.approx(np.log(0.5 / z0 + 0.5 / z1))


def test_closed_form_value_is_the_objective_and_a_saddle_point() -> None:
    p = random_preferences(4, seed=3)
    sol = closed_form(p, 0.3, 0.2)
    assert stackelberg_objective(p, sol.leader, sol.follower, 0.3, 0.2) == pytest.approx(sol.value)
    rng = np.random.default_rng(0)
    for _ in range(20):  # any other Follower does worse for it (J higher), any Leader lower
        other = rng.dirichlet(np.ones(4), size=4)
        assert stackelberg_objective(p, sol.leader, other, 0.3, 0.2) >= sol.value
        assert stackelberg_objective(p, rng.dirichlet(np.ones(4)), sol.follower, 0.3, 0.2) < (
            sol.value
        )


def test_closed_form_is_stable_at_tiny_tau() -> None:
    sol = closed_form(condorcet_preferences(), 1e-6, 1e-6)
    assert np.all(np.isfinite(sol.leader)) and np.all(np.isfinite(sol.follower))


@pytest.mark.parametrize("shares", [(0.4, 0.35, 0.25), (0.25, 0.4, 0.35), (0.3, 0.25, 0.45)])
def test_condorcet_leader_picks_the_largest_group_as_tau_vanishes(shares: tuple) -> None:
    sol = closed_form(condorcet_preferences(shares), 1e-3, 1e-3)
    largest = int(np.argmax(shares))
    assert sol.leader[largest] > 1 - 1e-9
    # Follower maps A->C, B->A, C->B; V(A)=α1, V(B)=α2, V(C)=α3, so the value is max α
    np.testing.assert_allclose(sol.follower, [[0, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-9)
    assert sol.value == pytest.approx(max(shares), abs=1e-9)


def test_references_are_validated() -> None:
    with pytest.raises(GameError, match="leader_ref must sum to 1"):
        closed_form(condorcet_preferences(), 0.1, 0.1, leader_ref=[0.5, 0.5, 0.5])
    with pytest.raises(GameError, match="follower_ref must have shape"):
        closed_form(condorcet_preferences(), 0.1, 0.1, follower_ref=UNIFORM3)
    with pytest.raises(GameError, match="tau_follower must be > 0"):
        closed_form(condorcet_preferences(), 0.1, 0.0)


# -- Algorithm 1 and the softmax variant --------------------------------------------------------
GAMES = [
    (condorcet_preferences(), 0.1, 0.1),
    (condorcet_preferences((0.4, 0.35, 0.25)), 0.1, 0.1),
    (random_preferences(3, seed=0), 0.25, 0.25),
    (random_preferences(4, seed=1), 0.25, 0.3),
    (random_preferences(5, seed=2), 0.3, 0.25),
]


@pytest.mark.parametrize("solver", [stackelberg_gda, softmax_policy_gradient])
@pytest.mark.parametrize("game", GAMES, ids=["condorcet", "condorcet-skewed", "r3", "r4", "r5"])
def test_gda_reaches_the_closed_form(solver, game) -> None:  # type: ignore[no-untyped-def]
    p, tau_l, tau_f = game
    oracle = closed_form(p, tau_l, tau_f)
    sol = solver(p, tau_l, tau_f)
    assert total_variation(sol.leader, oracle.leader) < 1e-3
    assert total_variation(sol.follower, oracle.follower) < 1e-3  # worst row
    assert sol.value == pytest.approx(oracle.value, abs=1e-3)


def test_gda_with_non_uniform_references() -> None:
    p = random_preferences(3, seed=4)
    pi_ref, omega_ref = [0.5, 0.3, 0.2], np.random.default_rng(1).dirichlet(np.ones(3), size=3)
    oracle = closed_form(p, 0.3, 0.3, pi_ref, omega_ref)
    sol = stackelberg_gda(p, 0.3, 0.3, leader_ref=pi_ref, follower_ref=omega_ref)
    assert total_variation(sol.leader, oracle.leader) < 1e-3
    assert total_variation(sol.follower, oracle.follower) < 1e-3


# -- NLHF and refinement ------------------------------------------------------------------------
def test_nash_is_uniform_at_equal_condorcet_shares() -> None:
    np.testing.assert_allclose(nash_equilibrium(condorcet_preferences(), 1e-3), UNIFORM3)


@pytest.mark.parametrize("tau", [1e-2, 0.1, 1.0])
def test_nash_is_the_regularised_fixed_point(tau: float) -> None:
    # the unique regularised NE satisfies π ∝ ref · exp(Pπ/τ)
    p = random_preferences(4, seed=5)
    pi = nash_equilibrium(p, tau)
    weights = np.exp(p @ pi / tau - np.max(p @ pi / tau))
    np.testing.assert_allclose(pi, weights / weights.sum(), atol=1e-8)


def test_nash_of_a_skewed_condorcet_game_is_mixed_not_the_largest_group() -> None:
    # With S = P − ½ (skew): S[A,B] = ½−α2, S[B,C] = ½−α3, S[C,A] = ½−α1. The unregularised NE
    # makes every answer tie: π ∝ (S[B,C], S[C,A], S[A,B]) = (½−α3, ½−α1, ½−α2).
    # Shares (0.4, 0.35, 0.25): (0.25, 0.10, 0.15) / 0.5 = (0.5, 0.2, 0.3); τ = 1e-3 is close.
    pi = nash_equilibrium(condorcet_preferences((0.4, 0.35, 0.25)), 1e-3)
    np.testing.assert_allclose(pi, [0.5, 0.2, 0.3], atol=5e-3)


def test_refinement_reaches_the_favourite_faster_than_resampling() -> None:
    favourites, shares = [0, 1, 2], [1 / 3] * 3
    slhf = closed_form(condorcet_preferences(), 1e-3, 1e-3)
    reach = reach_probabilities(slhf.leader, slhf.follower, favourites, shares, rounds=3)
    np.testing.assert_allclose(reach, [1 / 3, 2 / 3, 1.0], atol=1e-9)
    nash = nash_equilibrium(condorcet_preferences(), 1e-3)
    iid = reach_probabilities(nash, resampling_kernel(nash), favourites, shares, rounds=3)
    # 1 − (2/3)^k
    np.testing.assert_allclose(iid, [1 / 3, 5 / 9, 19 / 27], atol=1e-9)


# -- CLI --------------------------------------------------------------------------------------
def write(tmp_path: Path, matrix: object) -> str:
    path = tmp_path / "P.json"
    path.write_text(json.dumps(matrix))
    return str(path)


@pytest.mark.parametrize("method", ["closed-form", "gda", "softmax-pg"])
def test_cli_solve_prints_the_equilibrium(tmp_path: Path, capsys, method: str) -> None:  # type: ignore[no-untyped-def]
    p = condorcet_preferences((0.4, 0.35, 0.25))
    argv = ["game", "solve", "--preferences", write(tmp_path, p.tolist())]
    assert main([*argv, "--tau-leader", "0.1", "--tau-follower", "0.1", "--method", method]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # converged: no warning
    out = json.loads(captured.out)
    iterated = {"steps", "residual", "converged"} if method == "gda" else set()
    assert set(out) == {"leader", "follower", "value"} | iterated
    if method == "gda":
        assert out["converged"] and out["residual"] < 1e-9 and 1 < out["steps"] < 100_000
    oracle = closed_form(p, 0.1, 0.1)
    assert total_variation(np.array(out["leader"]), oracle.leader) < 1e-3
    assert total_variation(np.array(out["follower"]), oracle.follower) < 1e-3
    assert out["value"] == pytest.approx(oracle.value, abs=1e-3)


@pytest.mark.parametrize(
    "matrix, fragment",
    [
        ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], "square matrix; got shape (2, 3)"),
        ([[0.5, 1.5], [-0.5, 0.5]], "P[0][1] = 1.5, must be in [0, 1]"),
        ([[0.5, 0.7], [0.6, 0.5]], "P[0][1] + P[1][0] = 1.3, must be 1"),
    ],
)
def test_cli_rejects_bad_matrices(tmp_path: Path, capsys, matrix, fragment) -> None:  # type: ignore[no-untyped-def]
    argv = ["game", "solve", "--preferences", write(tmp_path, matrix)]
    assert main([*argv, "--tau-leader", "0.1", "--tau-follower", "0.1"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and err.startswith("slhf game solve:")


def test_cli_rejects_missing_files_and_bad_json(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    taus = ["--tau-leader", "0.1", "--tau-follower", "0.1"]
    assert main(["game", "solve", "--preferences", str(tmp_path / "nope.json"), *taus]) == 2
    assert "cannot read --preferences" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[[0.5,")
    assert main(["game", "solve", "--preferences", str(tmp_path / "bad.json"), *taus]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    negative = ["--tau-leader", "0.1", "--tau-follower", "-1"]
    assert main(["game", "solve", "--preferences", write(tmp_path, [[0.5]]), *negative]) == 2
    assert "tau_follower must be > 0" in capsys.readouterr().err


def test_cli_warns_when_softmax_pg_is_far_from_the_closed_form(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, condorcet_preferences((0.4, 0.35, 0.25)).tolist())
    taus = ["--tau-leader", "0.05", "--tau-follower", "0.05"]
    argv = ["game", "solve", "--preferences", path, *taus, "--method", "softmax-pg"]
    assert main([*argv, "--steps", "50"]) == 0
    captured = capsys.readouterr()
    assert "warning: softmax-pg after 50 steps is" in captured.err and "lower --lr" in captured.err
    assert set(json.loads(captured.out)) == {"leader", "follower", "value"}


def test_cli_gda_exits_1_with_its_residual_when_it_runs_out_of_steps(
    tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, condorcet_preferences((0.4, 0.35, 0.25)).tolist())
    taus = ["--tau-leader", "0.05", "--tau-follower", "0.05"]
    argv = ["game", "solve", "--preferences", path, *taus, "--method", "gda"]
    assert main([*argv, "--max-steps", "20"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["steps"] == 20 and out["converged"] is False and out["residual"] > 1e-9
    assert "gda did not converge: residual" in captured.err and "after 20 steps" in captured.err


def random_game_in_the_hard_range(seed: int) -> tuple[np.ndarray, float, float]:
    rng = np.random.default_rng(1000 + seed)
    n, (tau_l, tau_f) = int(rng.integers(4, 8)), rng.uniform(0.03, 0.1, size=2)
    return random_preferences(n, seed=200 + seed), float(tau_l), float(tau_f)


@pytest.mark.parametrize("seed", range(12))
def test_gda_converges_on_random_games_at_small_tau(seed: int) -> None:
    # 4-7 answers, τ in [0.03, 0.1]: equilibria with entries of 1e-9 and below, where a fixed
    # Euclidean step stalled 0.06 (total variation) away from the closed form.
    p, tau_l, tau_f = random_game_in_the_hard_range(seed)
    sol = stackelberg_gda(p, tau_l, tau_f)
    oracle = closed_form(p, tau_l, tau_f)
    assert sol.converged and sol.residual is not None and sol.residual < 1e-9
    assert total_variation(sol.leader, oracle.leader) < 1e-6
    assert total_variation(sol.follower, oracle.follower) < 1e-6
    assert sol.value == pytest.approx(oracle.value, abs=1e-6)


def test_cli_condorcet_and_nash(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["game", "condorcet"]) == 0
    out = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(out["reach"]["slhf"], [1 / 3, 2 / 3, 1.0], atol=1e-9)
    np.testing.assert_allclose(out["reach"]["nash_resampling"], [1 / 3, 5 / 9, 19 / 27], atol=1e-9)
    assert main(["game", "condorcet", "--shares", "0.4", "0.35", "0.25"]) == 0
    assert json.loads(capsys.readouterr().out)["stackelberg"]["leader"][0] > 1 - 1e-9
    path = write(tmp_path, condorcet_preferences().tolist())
    assert main(["game", "nash", "--preferences", path, "--tau", "0.01"]) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["policy"], UNIFORM3)
    assert main(["game", "condorcet", "--shares", "0.5", "0.5", "0.5"]) == 2
    assert "shares must be ≥ 0 and sum to 1" in capsys.readouterr().err
