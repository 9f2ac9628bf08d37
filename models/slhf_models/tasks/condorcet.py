"""The paper's Condorcet example as a text task (docs/demo.md): three styles, three annotator
groups.

A prompt asks for a number of things with one property that a subject has; an answer names
them in one of three styles::

    "Name 4 red things the baker has."
    A statement  "Here is a fact: the baker has 4 red things: red apple, red river, red map and
                  red book."
    B list       "Here is a list of 4 red things for the baker: red apple, red river, red map
                  and red book. That is all."
    C story      "Once upon a time the baker found 4 red things: red apple, red river, red map
                  and red book. The end."

The checkable content comes from the prompt: the subject's name (to copy), the property (every
thing named must have it) and the requested count (3-5 different things). The three styles
share the enumeration and differ in their frame. ``check`` reads an answer: its style (from
its opening words; None for anything else) and its content defects: a wrong fact (a thing
without the property, a thing beyond the count, another subject), a missing fact (fewer
different things than asked, no subject), a repeated phrase (a thing named twice) and no proper
ending (A: a final ".", B: "That is all.", C: "The end."). Clean answers are 28-46 tokens in
the project tokenizer. Which things an answer names is free for the checker; the demonstrations
always name the first ``count`` of ``DEMO_OBJECTS``, so their content is set by the prompt
(with free objects a tiny model spent its capacity on the choice and miscounted).

The preference is the paper's Condorcet mixture (docs/algorithm.md, "The Condorcet example"):
three groups with shares ``SHARES`` = (0.36, 0.33, 0.31) ranking the styles A≻B≻C, B≻C≻A and
C≻A≻B. Every group first prefers the answer with fewer defects; among equally clean answers it
follows its ranking (an answer in no style is last for everyone). ``p(y ≻ y' | x)`` = the share
of groups preferring ``y``, ties ½, so ``p + p' = 1``. Against a clean Leader answer in style A,
B or C the best clean Follower answer (C, A, B) wins 0.64, 0.67, 0.69; the Leader's best style
is A, which keeps 0.36.

Demonstrations for the warm start: equal style shares, half of them with one or two defects, the
things named always the first ``count`` of ``DEMO_OBJECTS`` (before defects); Follower-template
rows rewrite the given answer with the same things (defects included),
keeping its style with probability ½ or else taking one of the other two (``KEEP_STYLE``), so
the warm start reads the answer but learns nothing about which style wins or that defects
lose. How to run::

    python -m slhf_models.tasks.condorcet demos OUT.jsonl --n 8000 --follower-share 0.5
    python -m slhf_models.tasks.condorcet prompts OUT.jsonl --split test --n 256
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from slhf_models.preferences import CallablePreference, PreferenceError
from slhf_models.serving.templates import Prompt
from slhf_models.tasks.arith import TaskError, write_jsonl

STYLES = ("A", "B", "C")
SHARES = (0.36, 0.33, 0.31)
#: Group g ranks the styles in this order (best first): the paper's cyclic rankings.
RANKINGS = (("A", "B", "C"), ("B", "C", "A"), ("C", "A", "B"))
SPLITS = ("train", "test")
HELD_OUT_SHARE = 0.2
COUNTS = (3, 4, 5)
DEFECTS = ("wrong", "missing", "repeated", "unended")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


SUBJECTS = _words(
    "cat dog student neighbour engineer writer child doctor robot teacher farmer pilot artist "
    "scientist baker driver nurse judge poet friend musician gardener captain reader"
)
ADJECTIVES = _words(
    "short long simple clear new old small large quiet bright careful friendly honest quick "
    "slow green blue red warm cold famous strange useful gentle wooden golden ancient modern"
)
OBJECTS = _words(
    "story report bridge apple weather summary map letter garden song recipe window mountain "
    "problem lesson picture machine table river book computer language market ticket flower "
    "planet museum sentence"
)
PROMPT = "Name {n} {adj} things the {s} has."
_PROMPT = re.compile(r"^Name (\d) (\w+) things the (\w+) has\.$")
_THING = re.compile(rf"\b({'|'.join(ADJECTIVES)}) ({'|'.join(OBJECTS)})\b")
_SUBJECT = re.compile(rf"\b({'|'.join(SUBJECTS)})\b")
OPENINGS = {"A": "Here is a fact:", "B": "Here is a list", "C": "Once upon a time"}
ENDINGS = {"A": ".", "B": ". That is all.", "C": ". The end."}

Thing = tuple[str, str]  # (adjective, object)


@dataclass(frozen=True)
class Facts:
    """A prompt's checkable content: the subject, the property and the requested count."""

    subject: str
    adjective: str
    count: int


@dataclass(frozen=True)
class Verdict:
    """What ``check`` reads in an answer: its style (None: no style) and defect counts."""

    style: str | None
    wrong: int
    missing: int
    repeated: int
    unended: int

    @property
    def defects(self) -> int:
        return self.wrong + self.missing + self.repeated + self.unended


# -- prompts and splits ----------------------------------------------------------------------
def split_of(facts: Facts, split_seed: int = 0) -> str:
    """The split a prompt belongs to: a stable hash, independent of the sampling seed."""
    key = f"{split_seed}:{facts.subject}:{facts.adjective}:{facts.count}"
    digest = hashlib.sha256(key.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_SHARE else "train"


def all_facts(split: str, split_seed: int = 0) -> list[Facts]:
    """Every prompt of ``split`` (about 1,600 train and 400 held-out), in a fixed order."""
    if split not in SPLITS:
        raise TaskError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    every = [Facts(s, a, n) for s in SUBJECTS for a in ADJECTIVES for n in COUNTS]
    return [f for f in every if split_of(f, split_seed) == split]


def sample_facts(
    n: int, split: str = "train", *, seed: int = 0, split_seed: int = 0
) -> list[Facts]:
    """``n`` prompts of ``split`` drawn with ``seed``: distinct while the split lasts, then
    again in a fresh order (so ``n`` may exceed the split's size)."""
    pool = all_facts(split, split_seed)
    rng = random.Random(f"condorcet:{split}:{seed}")
    out: list[Facts] = []
    while len(out) < n:
        out += rng.sample(pool, min(len(pool), n - len(out)))
    return out


def _join(things: Sequence[Thing]) -> str:
    parts = [f"{a} {o}" for a, o in things]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def render_prompt(facts: Facts) -> str:
    return PROMPT.format(n=facts.count, adj=facts.adjective, s=facts.subject)


def sample_prompts(
    n: int, split: str = "train", *, seed: int = 0, split_seed: int = 0
) -> list[str]:
    """``n`` prompt strings of ``split`` (distinct up to the split's size)."""
    return [render_prompt(f) for f in sample_facts(n, split, seed=seed, split_seed=split_seed)]


def parse_prompt(prompt: Prompt) -> Facts:
    """The facts a prompt asks for; a conversation is read from its last user message."""
    text = (prompt if isinstance(prompt, str) else prompt[-1]["content"]).strip()
    m = _PROMPT.match(text)
    if not m or int(m[1]) not in COUNTS or m[2] not in ADJECTIVES or m[3] not in SUBJECTS:
        raise TaskError(f"not a condorcet task prompt: {text[:80]!r}")
    return Facts(m[3], m[2], int(m[1]))


# -- answers: rendering and the checker ------------------------------------------------------
def render_answer(style: str, facts: Facts, things: Sequence[Thing], ended: bool = True) -> str:
    """An answer in ``style`` to the prompt of ``facts`` naming ``things`` (as given)."""
    head = f"{facts.count} {facts.adjective} things"
    if style == "A":
        body = f"Here is a fact: the {facts.subject} has {head}: {_join(things)}"
    elif style == "B":
        body = f"Here is a list of {head} for the {facts.subject}: {_join(things)}"
    elif style == "C":
        body = f"Once upon a time the {facts.subject} found {head}: {_join(things)}"
    else:
        raise TaskError(f"style must be one of {', '.join(STYLES)}; got {style!r}")
    return body + ENDINGS[style] if ended else body


def classify(answer: str) -> str | None:
    """The answer's style, read from its opening words (``OPENINGS``); None for no style."""
    text = answer.lstrip()
    return next((style for style, opening in OPENINGS.items() if text.startswith(opening)), None)


def named_things(answer: str) -> list[Thing]:
    """The things an answer names, in order (repeats included)."""
    return [(a, o) for a, o in _THING.findall(answer)]


def check(prompt: Prompt, answer: str) -> Verdict:
    """The answer's style and its content defects against the prompt's facts."""
    facts = parse_prompt(prompt)
    style = classify(answer)
    named = named_things(answer)
    different = set(named)
    wrong = sum(a != facts.adjective for a, _ in different)
    wrong += max(0, len(different) - facts.count)  # more things than asked
    missing = max(0, facts.count - len(different))
    subjects = set(_SUBJECT.findall(answer))
    if facts.subject not in subjects:
        wrong, missing = (wrong + 1, missing) if subjects else (wrong, missing + 1)
    ended = style is not None and answer.rstrip().endswith(ENDINGS[style])
    return Verdict(style, wrong, missing, len(named) - len(different), int(not ended))


# -- the preference ----------------------------------------------------------------------------
def _rank(group: int, style: str | None) -> int:
    return RANKINGS[group].index(style) if style in STYLES else len(STYLES)


def style_preference(a: str | None, b: str | None, shares: Sequence[float] = SHARES) -> float:
    """Share of groups ranking style ``a`` above ``b`` (ties ½); no style is last for all."""
    total = 0.0
    for group, share in enumerate(shares):
        ra, rb = _rank(group, a), _rank(group, b)
        total += share * (1.0 if ra < rb else 0.5 if ra == rb else 0.0)
    return total


def condorcet_vote(prompt: Prompt, a: str, b: str, shares: Sequence[float] = SHARES) -> float:
    """``p(a ≻ b | x)``: fewer defects wins for every group; then the groups' style rankings."""
    va, vb = check(prompt, a), check(prompt, b)
    if va.defects != vb.defects:
        return 1.0 if va.defects < vb.defects else 0.0
    return style_preference(va.style, vb.style, shares)


class CondorcetPreference(CallablePreference):
    """The Condorcet mixture as a batched ``slhf_models.preferences.Preference``."""

    def __init__(self, shares: Sequence[float] = SHARES) -> None:
        if len(shares) != len(RANKINGS) or abs(sum(shares) - 1.0) > 1e-9 or min(shares) < 0:
            raise PreferenceError(f"shares must be 3 numbers ≥ 0 summing to 1; got {shares}")
        self.shares = tuple(shares)
        super().__init__(functools.partial(condorcet_vote, shares=self.shares))


TaskPreference = CondorcetPreference  # the name every task module exposes


def preference(prompt: Prompt, a: str, b: str) -> float:
    """Per-pair form, for ``preference: callable:slhf_models.tasks.condorcet:preference``."""
    return condorcet_vote(prompt, a, b)


# -- demonstrations --------------------------------------------------------------------------
#: Share of demonstrations with defects, and how many (one, or two with this probability).
DEFECT_SHARE, TWO_DEFECTS = 0.5, 0.25


def with_defects(
    facts: Facts, defects: Sequence[str], rng: random.Random
) -> tuple[list[Thing], bool]:
    """Things for an answer (the property, different objects) and whether it ends, after
    ``defects`` (names in DEFECTS)."""
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown:
        raise TaskError(f"unknown defects {unknown}; use names from {', '.join(DEFECTS)}")
    things = [(facts.adjective, o) for o in DEMO_OBJECTS[: facts.count]]
    if "missing" in defects:
        del things[rng.randrange(len(things))]
    if "wrong" in defects:
        i = rng.randrange(len(things))
        other = rng.choice([a for a in ADJECTIVES if a != facts.adjective])
        things[i] = (other, things[i][1])
    if "repeated" in defects:
        i = rng.randrange(len(things))
        things.insert(i + 1, things[i])
    return things, "unended" not in defects


#: The objects every demonstration names, in this order: the first ``count`` of them. Fixed, so
#: that a demonstration's content is set by its prompt (the property, the subject, the count) and
#: a tiny model can learn to count; the checker accepts any objects with the property.
DEMO_OBJECTS = ("apple", "book", "map", "river", "song")


def sample_defects(rng: random.Random) -> list[str]:
    if rng.random() >= DEFECT_SHARE:
        return []
    return rng.sample(DEFECTS, 2 if rng.random() < TWO_DEFECTS else 1)


#: Follower-template rows keep the given answer's style with this probability, else take one of
#: the other two at random. Departure from "a style drawn uniformly": with independent
#: styles the warm-started Follower never looked at the given answer (its style response matrix
#: had identical rows, "no conditioning"), and StackelbergGDA collapsed it onto one
#: style for every answer. Keeping with ½ makes it read the answer, yet tells it nothing about
#: which style wins: for each given style the other two are equally likely (the cyclic ranking
#: is invisible), and with uniform given styles the target styles stay uniform.
KEEP_STYLE = 0.5


def rewrite_style(given: str, rng: random.Random) -> str:
    """The style a Follower demonstration rewrites a ``given``-style answer into."""
    if rng.random() < KEEP_STYLE:
        return given
    return rng.choice([s for s in STYLES if s != given])


def demonstrations(
    n: int, *, seed: int = 0, split_seed: int = 0, follower_share: float = 0.5
) -> list[dict[str, str]]:
    """``n`` SFT rows ``{"prompt", "answer", "style", "defects"}`` on train prompts.

    Styles cycle A, B, C (equal shares); about half the answers carry defects. A
    ``follower_share`` of the rows get a ``response`` (rendered in the Follower template by the
    warm start): a demo answer in its own style with its own defects, and the row's ``answer``
    names the same things, defects included, in the style ``rewrite_style`` draws.
    """
    if not 0.0 <= follower_share <= 1.0:
        raise TaskError(f"follower_share must be in [0, 1]; got {follower_share}")
    rng = random.Random(f"condorcet-demos:{seed}")
    rows = []
    for i, facts in enumerate(sample_facts(n, "train", seed=seed, split_seed=split_seed)):
        defects = sample_defects(rng)
        things, ended = with_defects(facts, defects, rng)
        style = STYLES[i % len(STYLES)]
        row = {"prompt": render_prompt(facts), "style": style, "defects": "+".join(defects)}
        if rng.random() < follower_share:
            row["response"] = render_answer(style, facts, things, ended)
            row["style"] = rewrite_style(style, rng)
        row["answer"] = render_answer(row["style"], facts, things, ended)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slhf_models.tasks.condorcet", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demos = sub.add_parser("demos", help="write SFT demonstrations (JSONL)")
    prompts = sub.add_parser("prompts", help="write prompts {prompt} (JSONL)")
    for p in (demos, prompts):
        p.add_argument("out", type=Path)
        p.add_argument("--n", type=int, default=200)
        p.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--split", choices=SPLITS, default="test")
    demos.add_argument("--follower-share", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.command == "demos":
        rows = demonstrations(args.n, seed=args.seed, follower_share=args.follower_share)
    else:
        rows = [{"prompt": x} for x in sample_prompts(args.n, args.split, seed=args.seed)]
    print(write_jsonl(rows, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
