"""The single-token Stackelberg game of a language model, and its closed-form equilibrium.

One prompt ``x``; answers are single tokens (``max_new_tokens: 1``), so the Leader's policy is
the model's next-token distribution on ``T_L(x)`` and the Follower's row ``y`` is its
next-token distribution on ``T_F(x, y)``. The preference is the paper's Condorcet mixture
(docs/algorithm.md, "The Condorcet example") over three answer tokens A, B, C with shares ``α``;
any other token loses to A, B and C (p = 0) and ties with every other token (p = ½). With the
model's own distributions as references, ``slhf_models.game.closed_form`` gives the equilibrium
the trainer should reach over the whole vocabulary:

    ω*(y'|y) ∝ ω_ref(y'|y)·exp(−P[y, y']/τF)        π*(y) ∝ π_ref(y)·Z_F(y)^(−τF/τL)

``slhf game tokens`` prints it for any model folder; tests/unit/models/trainer/test_equilibrium.py
trains the
tiny llama and compares. Both roles are read at the sampling temperature (1 by default), the
Follower's prompt is rendered from the *decoded* Leader token, exactly as the trainer does.
torch and transformers are imported by the functions that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slhf_models.game import (
    StackelbergSolution,
    closed_form,
    condorcet_preferences,
    total_variation,
)
from slhf_models.serving.templates import TemplateRenderer

#: The prompt of the game (any prompt works; the test and the CLI default use this one).
DEFAULT_PROMPT = "Pick one letter."
DEFAULT_ANSWERS = ("A", "B", "C")
DEFAULT_SHARES = (0.40, 0.35, 0.25)


class TokenGameError(ValueError):
    """An answer that is not one token of the tokenizer, or not told apart from the others."""


@dataclass(frozen=True)
class TokenGame:
    """The answers' token ids, their decoded texts and the annotator shares."""

    answer_ids: tuple[int, ...]
    answer_texts: tuple[str, ...]
    shares: tuple[float, ...]
    vocab_size: int

    def preferences(self) -> np.ndarray:
        """``(V, V)`` ``P[y, y']``: Condorcet among the answers, answers beat other tokens."""
        v, ids = self.vocab_size, list(self.answer_ids)
        p = np.full((v, v), 0.5)
        is_answer = np.zeros(v, dtype=bool)
        is_answer[ids] = True
        p[np.ix_(is_answer, ~is_answer)] = 1.0
        p[np.ix_(~is_answer, is_answer)] = 0.0
        p[np.ix_(ids, ids)] = condorcet_preferences(self.shares)
        return p

    def preference(self, prompt: object, a: str, b: str) -> float:
        """``p(a ≻ b)`` on decoded texts: the trainer's preference (``CallablePreference``)."""
        ia, ib = self._index(a), self._index(b)
        if ia is None or ib is None:
            return 0.5 if ia is None and ib is None else float(ib is None)
        return float(condorcet_preferences(self.shares)[ia, ib])

    def _index(self, text: str) -> int | None:
        return self.answer_texts.index(text) if text in self.answer_texts else None


def token_game(
    tokenizer: Any,
    vocab_size: int,
    answers: Sequence[str] = DEFAULT_ANSWERS,
    shares: Sequence[float] = DEFAULT_SHARES,
) -> TokenGame:
    """Resolve three answer strings to single tokens whose decoded texts no other token has."""
    if len(answers) != 3 or len(shares) != 3:
        raise TokenGameError(f"the Condorcet game needs 3 answers and 3 shares; got {answers}")
    ids = []
    for text in answers:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise TokenGameError(f"answer {text!r} is {len(encoded)} tokens {encoded}; need 1")
        ids.append(encoded[0])
    texts = decoded_tokens(tokenizer, vocab_size)
    for text, i in zip(answers, ids, strict=True):
        twins = [j for j, t in enumerate(texts) if t == text and j != i]
        if texts[i] != text or twins:
            raise TokenGameError(f"answer {text!r} (token {i}) decodes like tokens {twins}")
    return TokenGame(tuple(ids), tuple(answers), tuple(float(s) for s in shares), vocab_size)


def decoded_tokens(tokenizer: Any, vocab_size: int) -> list[str]:
    """Each token id as the trainer's rollouts decode it (special tokens dropped)."""
    return [tokenizer.decode([i], skip_special_tokens=True) for i in range(vocab_size)]


def next_token_distributions(
    model: Any, tokenizer: Any, prompts: list[list[int]], *, temperature: float = 1.0
) -> np.ndarray:
    """``(N, V)`` float64 next-token distributions after each prompt's ids (no grad)."""
    import torch

    from slhf_models.trainer.rollouts import pad_left, stop_token_ids

    pad = stop_token_ids(tokenizer).pad
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), 256):
            ids, mask = (t.to(model.device) for t in pad_left(prompts[i : i + 256], pad))
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                logits_to_keep=1,
            ).logits[:, -1]  # (n, V)
            out.append(torch.softmax(logits.double() / temperature, dim=-1).cpu().numpy())
    return np.concatenate(out)


def policies(
    model: Any,
    tokenizer: Any,
    renderer: TemplateRenderer,
    prompt: str = DEFAULT_PROMPT,
    *,
    temperature: float = 1.0,
    rows: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``π(·|T_L(x))`` ``(V,)`` and ``ω(·|T_F(x, y))`` ``(V, V)`` for every token ``y``, on the
    ids the trainer samples from (``renderer.encode``; the Follower's prompt spliced from the
    Leader's ids where the template allows it, as the trainer and the server build it).

    With ``rows`` only those Follower rows are computed; the others are NaN (enough for
    ``distances`` and ``summary``, which read the answers' rows).
    """
    from slhf_models.trainer.rollouts import stop_token_ids

    vocab = model.config.vocab_size
    texts = decoded_tokens(tokenizer, vocab)
    wanted = list(range(vocab)) if rows is None else list(rows)
    lead = renderer.encode_role("leader", prompt, None)
    tail, _ = renderer.follower_tail()
    stops = set(stop_token_ids(tokenizer).stop)

    def follower_ids(y: int) -> list[int]:
        if tail is None:
            return renderer.encode_role("follower", prompt, texts[y])
        return [*lead, *([] if y in stops else [y]), *tail]  # a stop token is not in the text

    leader = next_token_distributions(model, tokenizer, [lead], temperature=temperature)[0]
    follower = np.full((vocab, vocab), np.nan)
    follower[wanted] = next_token_distributions(
        model, tokenizer, [follower_ids(y) for y in wanted], temperature=temperature
    )
    return leader, follower


def equilibrium(
    game: TokenGame,
    references: tuple[np.ndarray, np.ndarray],
    tau_leader: float,
    tau_follower: float,
) -> StackelbergSolution:
    """The closed-form equilibrium with the model's distributions as references."""
    leader_ref, follower_ref = references
    return closed_form(
        game.preferences(),
        tau_leader,
        tau_follower,
        leader_ref=leader_ref / leader_ref.sum(),
        follower_ref=follower_ref / follower_ref.sum(axis=1, keepdims=True),
    )


def distances(
    game: TokenGame, trained: tuple[np.ndarray, np.ndarray], target: StackelbergSolution
) -> dict[str, float]:
    """Total variation of the trained Leader and of each answer's Follower row to the target."""
    leader, follower = trained
    out = {"leader": total_variation(leader, target.leader)}
    for text, i in zip(game.answer_texts, game.answer_ids, strict=True):
        out[f"follower[{text}]"] = total_variation(follower[i], target.follower[i])
    return out


def summary(game: TokenGame, leader: np.ndarray, follower: np.ndarray) -> dict[str, object]:
    """The answers' probabilities (and "other") under the Leader and each answer's row."""

    def on_answers(dist: np.ndarray) -> dict[str, float]:
        probs = {t: float(dist[i]) for t, i in zip(game.answer_texts, game.answer_ids, strict=True)}
        return probs | {"other": float(1.0 - sum(probs.values()))}

    rows = {
        t: on_answers(follower[i]) for t, i in zip(game.answer_texts, game.answer_ids, strict=True)
    }
    return {"leader": on_answers(leader), "follower": rows}
