"""The single-token Condorcet game of a model (models/slhf_models/token_game.py) and ``slhf game
tokens``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slhf.cli import main
from slhf_models.game import closed_form, condorcet_preferences
from slhf_models.token_game import TokenGame, TokenGameError, token_game

GAME = TokenGame((5, 6, 7), ("A", "B", "C"), (0.4, 0.35, 0.25), vocab_size=10)


def test_answers_play_condorcet_beat_every_other_token_and_others_tie() -> None:
    p = GAME.preferences()
    np.testing.assert_allclose(p[np.ix_([5, 6, 7], [5, 6, 7])], condorcet_preferences(GAME.shares))
    assert p[5, 0] == 1.0 and p[0, 7] == 0.0 and p[0, 9] == 0.5
    np.testing.assert_allclose(p + p.T, 1.0)
    # the trainer's preference on decoded texts agrees with the matrix
    assert GAME.preference("x", "A", "B") == pytest.approx(p[5, 6]) == pytest.approx(0.65)
    assert (GAME.preference("x", "C", "zz"), GAME.preference("x", "", "B")) == (1.0, 0.0)
    assert GAME.preference("x", "zz", "") == 0.5


def test_answers_must_be_single_tokens_nothing_else_decodes_to(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert token_game(tokenizer, 1024).answer_ids == tuple(
        tokenizer.encode(t, add_special_tokens=False)[0] for t in "ABC"
    )
    with pytest.raises(TokenGameError, match="answer ' A' is 2 tokens"):
        token_game(tokenizer, 1024, answers=(" A", "B", "C"))


def test_cli_tokens_prints_the_closed_form_from_the_models_logits(tiny: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    taus = ["--tau-leader", "0.1", "--tau-follower", "0.1"]
    assert main(["game", "tokens", "--model", str(tiny), *taus]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"answers", "reference", "equilibrium", "value"}
    ref, eq = out["reference"], out["equilibrium"]
    assert sum(ref["leader"].values()) == pytest.approx(1.0)
    # the equilibrium moves mass onto A, B, C (they beat every other token)
    moved = sum(eq["leader"][t] for t in "ABC") > sum(ref["leader"][t] for t in "ABC")
    assert moved
    # Follower rows: against B the best answer is A (0.65), so ω*(A|B)/ω*(C|B) grows vs the ref
    ratio = eq["follower"]["B"]["A"] / eq["follower"]["B"]["C"]
    assert ratio > ref["follower"]["B"]["A"] / ref["follower"]["B"]["C"]
    # the Follower's references depend on its instruction: another one, another target
    argv = ["game", "tokens", "--model", str(tiny), *taus, "--follower-instruction", "Improve it."]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["reference"]["follower"] != ref["follower"]
    assert main(["game", "tokens", "--model", str(tiny), *taus, "--answers", " A", "B", "C"]) == 2
    assert "is 2 tokens" in capsys.readouterr().err


def test_closed_form_of_a_three_answer_game_matches_the_vocabulary_game_restricted() -> None:
    # with reference mass only on A, B, C the vocabulary game is the 3-answer Condorcet game
    ref = np.full(10, 1e-12)
    ref[[5, 6, 7]] = 1.0
    ref /= ref.sum()
    full = closed_form(GAME.preferences(), 0.2, 0.2, ref, np.tile(ref, (10, 1)))
    small = closed_form(condorcet_preferences(GAME.shares), 0.2, 0.2)
    np.testing.assert_allclose(full.leader[[5, 6, 7]], small.leader, atol=1e-9)
    rows = full.follower[np.ix_([5, 6, 7], [5, 6, 7])]
    np.testing.assert_allclose(rows, small.follower, atol=1e-9)
