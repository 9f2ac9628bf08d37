"""Preference functions ``p(y ≻ y' | x) ∈ [0, 1]`` behind one batched protocol.

docs/algorithm.md ("Preference functions") says which the paper used and where these depart.

SLHF needs no Bradley–Terry model and no transitivity: anything that compares two answers to the
same prompt will do. Every preference here is called on a batch::

    p = preference(prompts, answers_a, answers_b)     # list[float], p[i] = p(a_i ≻ b_i | x_i)

Implementations:

- ``CallablePreference(fn)``: a Python function ``fn(prompt, a, b) -> float`` per pair.
- ``RewardModelPreference``: a Bradley–Terry reward model (a sequence-classification head with one
  output) scores ``[user: x] [assistant: y]``; ``p = σ(r_a − r_b)``.
- ``MultiAttributeVote``: HelpSteer2 style; several scorers (one reward model per attribute), some
  inverted (verbosity, complexity: lower is better); ``p`` = share of attributes on which ``a``
  scores at least as well as ``b``. The paper's "minus 1.0 for a missing EOS" is not part of the
  vote: the trainer applies it (``missing_eos_penalty``), so the vote stays in [0, 1].
- ``LLMJudgePreference``: a pairwise judge over any OpenAI-compatible ``/chat/completions``
  endpoint, asked to reply "A" or "B"; ``p = softmax(logprobs / 0.9)`` over the two tokens, the
  answers' positions swapped at random (seeded) to cancel position bias, ½ on any error.

A pair that could not be scored (a judge error or a reply without A/B, a non-finite reward) is
returned as ``Unscored(reason)``: a float equal to ½ (the paper's rule for judge errors), so a
caller that only averages sees ½, while the trainer counts them per step and stops the run when
too many fail (``max_preference_error_rate``, models/slhf_models/trainer/config.py)::

    failed = [p for p in preference(prompts, a, b) if isinstance(p, Unscored)]

torch and transformers are imported only by the reward-model classes.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import httpx

from slhf_models.serving.templates import Message, Prompt, to_messages


class PreferenceError(ValueError):
    """A preference function returned something that is not a probability, or bad inputs."""


class Unscored(float):
    """½ in place of a preference that could not be computed; ``reason`` says why."""

    reason: str

    def __new__(cls, reason: str) -> Unscored:
        value = super().__new__(cls, 0.5)
        value.reason = reason
        return value

    def __repr__(self) -> str:
        return f"Unscored({self.reason!r})"


def unscored(values: Sequence[float]) -> list[Unscored]:
    """The entries of a preference batch that could not be scored."""
    return [v for v in values if isinstance(v, Unscored)]


def _sigmoid(z: float) -> float:
    """σ(z) without overflow for large |z| (math.exp(710) raises)."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class Preference(Protocol):
    """``p(a_i ≻ b_i | x_i)`` for a batch of prompts and answer pairs, each in [0, 1]."""

    def __call__(
        self, prompts: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> list[float]: ...


class Scorer(Protocol):
    """A scalar score per (prompt, answer); higher is better unless inverted by the caller."""

    def scores(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]: ...


def _check_batch(prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> None:
    if not len(prompts) == len(a) == len(b):
        raise PreferenceError(
            f"prompts, answers_a and answers_b must have the same length; "
            f"got {len(prompts)}, {len(a)}, {len(b)}"
        )


def _probability(value: float, where: str) -> float:
    if isinstance(value, Unscored):  # a function may report a pair it could not score
        return value
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise PreferenceError(f"{where} returned {value}; a preference must be in [0, 1]")
    return value


# -- a Python function -------------------------------------------------------------------------
class CallablePreference:
    """Wrap ``fn(prompt, a, b) -> float`` (one pair at a time) as a batched preference."""

    def __init__(self, fn: Callable[[Prompt, str, str], float]) -> None:
        self.fn = fn

    def __call__(
        self, prompts: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> list[float]:
        _check_batch(prompts, answers_a, answers_b)
        name = getattr(self.fn, "__name__", "preference function")
        return [
            _probability(self.fn(x, a, b), name)
            for x, a, b in zip(prompts, answers_a, answers_b, strict=True)
        ]


# -- Bradley–Terry reward models ---------------------------------------------------------------
class RewardModelScorer:
    """Scores ``[user: x] [assistant: y]`` with a one-output sequence-classification model.

    The conversation is rendered with the tokenizer's chat template when it has one, else as
    ``x + "\\n\\n" + y``. Scoring runs in batches of ``batch_size`` without gradients.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, batch_size: int = 16, max_length: int = 1024
    ) -> None:
        if model.config.num_labels != 1:
            raise PreferenceError(
                f"a reward model needs one output (num_labels=1); got {model.config.num_labels}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> RewardModelScorer:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        return cls(model, tokenizer, **kwargs)

    def render(self, prompt: Prompt, answer: str) -> str:
        messages = [*to_messages(prompt), {"role": "assistant", "content": answer}]
        if self.tokenizer.chat_template:
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False))
        return "\n\n".join(m["content"] for m in messages)

    def scores(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
        import torch

        texts = [self.render(x, y) for x, y in zip(prompts, answers, strict=True)]
        out: list[float] = []
        pad_id = self.tokenizer.pad_token_id
        if self.model.config.pad_token_id is None:  # HF finds the last token through the pad id
            self.model.config.pad_token_id = pad_id
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not self.tokenizer.chat_template,
            )
            with torch.no_grad():
                logits = self.model(**enc).logits  # (b, 1)
            out.extend(logits[:, 0].float().tolist())
        return out


class RewardModelPreference:
    """Bradley–Terry: ``p(a ≻ b) = σ(r(x, a) − r(x, b))`` with one reward model."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> RewardModelPreference:
        return cls(RewardModelScorer.from_pretrained(path, **kwargs))

    def __call__(
        self, prompts: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> list[float]:
        _check_batch(prompts, answers_a, answers_b)
        n = len(prompts)
        r = self.scorer.scores([*prompts, *prompts], [*answers_a, *answers_b])  # one batch
        return [_bradley_terry(r[i], r[n + i]) for i in range(n)]


def _bradley_terry(ra: float, rb: float) -> float:
    if not (math.isfinite(ra) and math.isfinite(rb)):
        return Unscored(f"the reward model returned a non-finite reward ({ra}, {rb})")
    return _sigmoid(ra - rb)


class MultiAttributeVote:
    """Share of attributes on which ``a`` scores at least as well as ``b`` (HelpSteer2 style).

    ``inverted[k]`` marks attribute ``k`` as lower-is-better (the paper inverts verbosity and
    complexity). Ties count for ``a``, as in the paper's "y scores ≥ y'".
    """

    def __init__(self, scorers: Sequence[Scorer], inverted: Sequence[bool] | None = None) -> None:
        if not scorers:
            raise PreferenceError("MultiAttributeVote needs at least one scorer")
        inverted = list(inverted) if inverted is not None else [False] * len(scorers)
        if len(inverted) != len(scorers):
            raise PreferenceError(
                f"inverted has {len(inverted)} entries for {len(scorers)} scorers; give one each"
            )
        self.scorers = list(scorers)
        self.inverted = inverted

    def __call__(
        self, prompts: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> list[float]:
        _check_batch(prompts, answers_a, answers_b)
        n = len(prompts)
        wins = [0] * n
        failed: dict[int, str] = {}
        for k, (scorer, inverted) in enumerate(zip(self.scorers, self.inverted, strict=True)):
            r = scorer.scores([*prompts, *prompts], [*answers_a, *answers_b])
            for i in range(n):
                a, b = (r[n + i], r[i]) if inverted else (r[i], r[n + i])
                wins[i] += a >= b
                if not (math.isfinite(a) and math.isfinite(b)):
                    failed[i] = f"scorer {k} returned a non-finite score ({r[i]}, {r[n + i]})"
        return [
            Unscored(failed[i]) if i in failed else w / len(self.scorers)
            for i, w in enumerate(wins)
        ]


# -- a pairwise LLM judge ----------------------------------------------------------------------
JUDGE_SYSTEM = (
    "You are a careful judge. Compare two answers to the same prompt and reply with a single "
    "letter: A if Answer A is better, B if Answer B is better."
)
JUDGE_USER = (
    "Prompt:\n{prompt}\n\n"
    "Answer A:\n{a}\n\n"
    "Answer B:\n{b}\n\n"
    "Which answer is better? Reply with exactly one letter: A or B."
)


class LLMJudgePreference:
    """Pairwise LLM judge over an OpenAI-compatible ``/chat/completions`` endpoint.

    Per pair: the two answers are shown as A and B in a random order (``seed``), the judge is
    asked for one token with ``top_logprobs``, and ``p("shown-A better") = softmax(l_A/T, l_B/T)``
    with ``T = softmax_temperature`` (0.9 in the paper); a token missing from the top list has
    logprob −∞. With ``logprobs=False`` (endpoints without logprobs) the reply text decides
    (1 or 0). Any error (HTTP, timeout, a reply without A or B) gives ``Unscored``, which is
    ½ (the paper's rule, docs/algorithm.md) and which the trainer counts. Requests run on
    ``max_concurrency`` threads with a ``timeout_s`` bound each.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        seed: int = 0,
        softmax_temperature: float = 0.9,
        logprobs: bool = True,
        top_logprobs: int = 5,
        timeout_s: float = 30.0,
        max_concurrency: int = 8,
        client: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout_s, headers=headers)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.rng = random.Random(seed)
        self.softmax_temperature = softmax_temperature
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency

    def __call__(
        self, prompts: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> list[float]:
        _check_batch(prompts, answers_a, answers_b)
        swaps = [self.rng.random() < 0.5 for _ in prompts]  # drawn up front: order-independent
        jobs = [
            (x, b, a) if swap else (x, a, b)
            for x, a, b, swap in zip(prompts, answers_a, answers_b, swaps, strict=True)
        ]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            shown_a_wins = list(pool.map(lambda job: self._judge(*job), jobs))
        return [
            1.0 - p if swap and not isinstance(p, Unscored) else p
            for p, swap in zip(shown_a_wins, swaps, strict=True)
        ]

    def _judge(self, prompt: Prompt, a: str, b: str) -> float:
        """p(shown A ≻ shown B); ``Unscored`` (½) with the reason on any error."""
        try:
            text = prompt if isinstance(prompt, str) else _conversation_text(prompt)
            body: dict[str, Any] = {
                "model": self.model,
                "messages": [
                    {"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": JUDGE_USER.format(prompt=text, a=a, b=b)},
                ],
                "max_tokens": 1,
                "temperature": 0.0,
            }
            if self.logprobs:
                body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
            response = self.client.post(self.url, json=body, timeout=self.timeout_s)
            response.raise_for_status()
            return self._parse(response.json()["choices"][0])
        except Exception as e:  # any judge failure is a draw (the paper's rule), and is counted
            return Unscored(f"judge {self.url}: {type(e).__name__}: {e}"[:500])

    def _parse(self, choice: dict[str, Any]) -> float:
        if not self.logprobs:
            reply = (choice["message"]["content"] or "").strip()
            letter = re.match(r"\W*([AB])(\W|$)", reply.upper())  # "A", " B.", not "Both"
            if letter is None:
                return Unscored(f"judge {self.url} replied {reply[:40]!r}, not A or B")
            return 1.0 if letter.group(1) == "A" else 0.0
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        best: dict[str, float] = {}
        for entry in top:
            letter = entry["token"].strip().upper()
            if letter in ("A", "B"):
                best[letter] = max(best.get(letter, -math.inf), float(entry["logprob"]))
        if not best:
            tokens = [entry["token"] for entry in top]
            return Unscored(f"judge {self.url}: neither A nor B among the top tokens {tokens}")
        t = self.softmax_temperature
        la, lb = best.get("A", -math.inf) / t, best.get("B", -math.inf) / t
        m = max(la, lb)
        ea, eb = math.exp(la - m), math.exp(lb - m)
        return ea / (ea + eb)


def _conversation_text(messages: Sequence[Message]) -> str:
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in to_messages(messages))
