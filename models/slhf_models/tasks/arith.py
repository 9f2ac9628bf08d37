"""A synthetic arithmetic task with a programmatic, intransitive preference (docs/trainer.md).

Prompts are short sums and differences a tiny model trained from scratch can learn in minutes::

    "Add 17 and 25."            -> "17 plus 25 is 42."
    "Subtract 8 from 30."       -> "30 minus 8 is 22."

The preference is built like the paper's HelpSteer2 setup: a vote over measurable attributes of
an answer (``ATTRIBUTES``), each a scorer where higher is better:

- ``correct``   minus the distance of the last number in the answer to the result (cap 10)
- ``relevant``  share of the two operands the answer mentions (0, ½, 1)
- ``brief``     minus the number of words
- ``fresh``     minus the number of repeated word bigrams (no repetition)
- ``ended``     1 if the answer ends with ".", "!" or "?" (a proper ending), else 0

``p(a ≻ b | x)`` = (attributes where ``a`` wins + ½ · ties) / 5, so ``p(a, b) + p(b, a) = 1``.
A vote over criteria is intransitive; ``cycle_share`` measures how often. Correctness is graded
on purpose: with two-level criteria a majority vote is always transitive (dichotomous
preferences), so a cycle needs at least three attributes with three or more levels.

Splits: every (operation, a, b) key belongs to exactly one split (a seeded hash with
``split_seed``), so train and held-out prompts are disjoint whatever ``seed`` draws them.

Demonstrations for the warm start are deliberately mixed (``DEMO_DEFECTS``): wrong, bare,
partial, verbose, repetitive, unended and truncated answers and their combinations, so a base
model trained on them leaves room to improve. How to run::

    python -m slhf_models.tasks.arith demos OUT.jsonl --n 4000  # SFT rows {prompt, answer, style}
    python -m slhf_models.tasks.arith demos OUT.jsonl --follower-share 0.5  # half in T_F
    python -m slhf_models.tasks.arith prompts OUT.jsonl --split test --n 256
    python -m slhf_models.tasks.arith cycles --n 200                 # cycle share over demo answers
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from slhf_models.preferences import CallablePreference, Preference, PreferenceError
from slhf_models.serving.templates import Prompt
from slhf_models.tasks.graphs import cycle_share

OPS = ("add", "sub")
MAX_OPERAND = 99
SPLITS = ("train", "test")
HELD_OUT_SHARE = 0.2  # of all (op, a, b) keys
MAX_ERROR = 10  # cap of the correctness distance; also the score of an answer with no number
ATTRIBUTES = ("correct", "relevant", "brief", "fresh", "ended")

_PROMPTS = {
    "add": ("Add {a} and {b}.", "What is {a} plus {b}?"),
    "sub": ("Subtract {b} from {a}.", "What is {a} minus {b}?"),
}
_WORD = {"add": "plus", "sub": "minus"}
_ADD = re.compile(r"^(?:Add (\d+) and (\d+)\.|What is (\d+) plus (\d+)\?)$")
_SUB = re.compile(r"^(?:Subtract (\d+) from (\d+)\.|What is (\d+) minus (\d+)\?)$")
_NUMBER = re.compile(r"-?\d+")


class TaskError(ValueError):
    """A prompt that is not one of this task's prompts, or bad generator arguments."""


@dataclass(frozen=True)
class Problem:
    """One prompt's checkable content: ``a op b = result``."""

    op: str
    a: int
    b: int

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "add" else self.a - self.b

    def canonical(self) -> str:
        """The best answer under every attribute but brevity."""
        return f"{self.a} {_WORD[self.op]} {self.b} is {self.result}."


# -- prompts and splits ----------------------------------------------------------------------
def split_of(op: str, a: int, b: int, split_seed: int = 0) -> str:
    """The split a key belongs to: a stable hash, independent of the sampling seed."""
    digest = hashlib.sha256(f"{split_seed}:{op}:{a}:{b}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_SHARE else "train"


@functools.cache
def split_size(split: str, split_seed: int = 0) -> int:
    """How many distinct problems ``split`` holds."""
    keys = [("add", a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    keys += [("sub", a, b) for a in range(MAX_OPERAND + 1) for b in range(a + 1)]
    return sum(split_of(*key, split_seed) == split for key in keys)


def sample_problems(
    n: int, split: str = "train", *, seed: int = 0, split_seed: int = 0
) -> list[Problem]:
    """``n`` distinct problems of ``split``, drawn with ``seed``."""
    if split not in SPLITS:
        raise TaskError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    rng = random.Random(f"arith:{split}:{seed}")
    seen: set[Problem] = set()
    out: list[Problem] = []
    if n > (capacity := split_size(split, split_seed)):
        raise TaskError(f"asked for {n} {split} prompts; the split holds {capacity:,}")
    while len(out) < n:
        op = rng.choice(OPS)
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        if op == "sub" and b > a:
            a, b = b, a  # no negative results
        problem = Problem(op, a, b)
        if problem in seen or split_of(op, a, b, split_seed) != split:
            continue
        seen.add(problem)
        out.append(problem)
    return out


def render_prompt(problem: Problem, variant: int = 0) -> str:
    return _PROMPTS[problem.op][variant % 2].format(a=problem.a, b=problem.b)


def sample_prompts(
    n: int, split: str = "train", *, seed: int = 0, split_seed: int = 0
) -> list[str]:
    """``n`` prompt strings of ``split``; both phrasings appear."""
    problems = sample_problems(n, split, seed=seed, split_seed=split_seed)
    return [render_prompt(p, i) for i, p in enumerate(problems)]


def parse_prompt(prompt: Prompt) -> Problem:
    """The problem a prompt asks; a conversation is read from its last user message."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    text = text.strip()
    if m := _ADD.match(text):
        a, b = (int(g) for g in m.groups() if g is not None)
        return Problem("add", a, b)
    if m := _SUB.match(text):
        x, y = (int(g) for g in m.groups() if g is not None)
        return Problem("sub", y, x) if text.startswith("Subtract") else Problem("sub", x, y)
    raise TaskError(f"not an arithmetic task prompt: {text[:80]!r}")


# -- attribute scorers -----------------------------------------------------------------------
def _numbers(answer: str) -> list[int]:
    return [int(n) for n in _NUMBER.findall(answer)]


def score_correct(problem: Problem, answer: str) -> float:
    """Minus the distance of the stated result (the last number) to the truth, capped at 10."""
    numbers = _numbers(answer)
    if not numbers:
        return -float(MAX_ERROR)
    return -float(min(abs(numbers[-1] - problem.result), MAX_ERROR))


def score_relevant(problem: Problem, answer: str) -> float:
    numbers = _numbers(answer)
    if problem.a == problem.b:  # "4 plus 4": the operand must appear twice
        return min(numbers.count(problem.a), 2) / 2
    return ((problem.a in numbers) + (problem.b in numbers)) / 2


def score_brief(problem: Problem, answer: str) -> float:
    return -float(len(answer.split()))


def score_fresh(problem: Problem, answer: str) -> float:
    words = answer.lower().split()
    bigrams = list(itertools.pairwise(words))
    return -float(len(bigrams) - len(set(bigrams)))


def score_ended(problem: Problem, answer: str) -> float:
    return float(answer.rstrip().endswith((".", "!", "?")))


SCORERS: dict[str, Callable[[Problem, str], float]] = {
    "correct": score_correct,
    "relevant": score_relevant,
    "brief": score_brief,
    "fresh": score_fresh,
    "ended": score_ended,
}


def attribute_scores(prompt: Prompt, answer: str) -> dict[str, float]:
    problem = parse_prompt(prompt)
    return {name: SCORERS[name](problem, answer) for name in ATTRIBUTES}


# -- the preference --------------------------------------------------------------------------
def vote(prompt: Prompt, a: str, b: str, attributes: Sequence[str] = ATTRIBUTES) -> float:
    """``p(a ≻ b | x)``: share of attributes where ``a`` scores higher, ties counting ½."""
    problem = parse_prompt(prompt)
    total = 0.0
    for name in attributes:
        sa, sb = SCORERS[name](problem, a), SCORERS[name](problem, b)
        total += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
    return total / len(attributes)


class TaskPreference(CallablePreference):
    """The attribute vote as a batched ``slhf_models.preferences.Preference``.

    ``attributes`` picks a subset of ``ATTRIBUTES`` (default: all five).
    """

    def __init__(self, attributes: Sequence[str] = ATTRIBUTES) -> None:
        unknown = [a for a in attributes if a not in SCORERS]
        if unknown or not attributes:
            raise PreferenceError(
                f"attributes must be a non-empty subset of {', '.join(ATTRIBUTES)}; got {unknown}"
            )
        self.attributes = tuple(attributes)
        super().__init__(functools.partial(vote, attributes=self.attributes))


def preference(prompt: Prompt, a: str, b: str) -> float:
    """Per-pair form, for ``preference: callable:slhf_models.tasks.arith:preference``."""
    return vote(prompt, a, b)


# -- demonstrations --------------------------------------------------------------------------
#: The warm-start mix: each demonstration starts from the canonical answer and gets each defect
#: independently with this probability (about 31% come out clean). Defects trade attributes
#: against each other, which is what makes the vote intransitive.
DEMO_DEFECTS: dict[str, float] = {
    "wrong": 0.25,  # result off by 1..9                       "17 plus 25 is 45."
    "bare": 0.15,  # the result alone, no operands            "42."
    "partial": 0.10,  # one operand only                      "Plus 25 is 42."
    "verbose": 0.20,  # a chatty preamble                     "Sure! Let me work it out. 17 ..."
    "repetitive": 0.15,  # the statement said twice           "17 plus 25 is 42. 17 plus 25 is 42."
    "unended": 0.15,  # no final full stop                    "17 plus 25 is 42"
    "truncated": 0.10,  # cut before the result (overrides)   "17 plus 25 is"
}
_PREAMBLES = ("Sure!", "Here is the answer.", "Sure! Let me work it out step by step.")


def demo_answer(problem: Problem, defects: Sequence[str], rng: random.Random) -> str:
    """The canonical answer of ``problem`` with ``defects`` (names from DEMO_DEFECTS) applied."""
    unknown = [d for d in defects if d not in DEMO_DEFECTS]
    if unknown:
        raise TaskError(f"unknown defects {unknown}; use names from {', '.join(DEMO_DEFECTS)}")
    statement = f"{problem.a} {_WORD[problem.op]} {problem.b} is"
    if "truncated" in defects:
        return statement
    result = problem.result
    if "wrong" in defects:
        result += rng.choice([-1, 1]) * rng.randint(1, 9)
    if "bare" in defects:
        body = f"{result}"
    elif "partial" in defects:
        body = f"{_WORD[problem.op].capitalize()} {problem.b} is {result}"
    else:
        body = f"{statement} {result}"
    answer = body if "unended" in defects else f"{body}."
    if "repetitive" in defects:
        answer = f"{body}. {answer}"
    if "verbose" in defects:
        answer = f"{rng.choice(_PREAMBLES)} {answer}"
    return answer


def sample_defects(rng: random.Random) -> list[str]:
    return [d for d, share in DEMO_DEFECTS.items() if rng.random() < share]


def demonstrations(
    n: int, *, seed: int = 0, split_seed: int = 0, follower_share: float = 0.0
) -> list[dict[str, str]]:
    """``n`` SFT rows ``{"prompt", "answer", "style"}`` on train prompts (DEMO_DEFECTS mix).

    ``style`` names the defects joined by "+", or "correct". A ``follower_share`` of the rows
    also get a ``response``: another, independently drawn demo answer to the same prompt, which
    the warm start renders in the Follower template. Those rows teach the template's format
    only: their ``answer`` is drawn without looking at ``response``, so the warm start learns no
    refinement (the Follower of the base is as good as its Leader, the paper's control).
    """
    if not 0.0 <= follower_share <= 1.0:
        raise TaskError(f"follower_share must be in [0, 1]; got {follower_share}")
    rng = random.Random(f"arith-demos:{seed}")
    problems = sample_problems(n, "train", seed=seed, split_seed=split_seed)
    rows = []
    for i, problem in enumerate(problems):
        defects = sample_defects(rng)
        answer = demo_answer(problem, defects, rng)
        style = "+".join(defects) or "correct"
        row = {"prompt": render_prompt(problem, i), "answer": answer, "style": style}
        if rng.random() < follower_share:
            row["response"] = demo_answer(problem, sample_defects(rng), rng)
        rows.append(row)
    return rows


def write_jsonl(rows: Sequence[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def demo_cycle_share(
    n_prompts: int = 200,
    answers_per_prompt: int = 5,
    *,
    seed: int = 0,
    pref: Preference | None = None,
) -> float:
    """Cycle share of the vote over ``answers_per_prompt`` demo-style answers per held-out prompt.

    Answers are drawn from the DEMO_DEFECTS mix, as the warm-start base would sample them.
    """
    rng = random.Random(f"arith-cycles:{seed}")
    problems = sample_problems(n_prompts, "test", seed=seed)
    prompts = [render_prompt(p, i) for i, p in enumerate(problems)]
    answer_sets = [
        [demo_answer(p, sample_defects(rng), rng) for _ in range(answers_per_prompt)]
        for p in problems
    ]
    return cycle_share(prompts, answer_sets, pref or TaskPreference())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slhf_models.tasks.arith", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demos = sub.add_parser("demos", help="write SFT demonstrations (JSONL)")
    prompts = sub.add_parser("prompts", help="write prompts {prompt} (JSONL)")
    cycles = sub.add_parser("cycles", help="print the cycle share over demonstration answers")
    for p in (demos, prompts):
        p.add_argument("out", type=Path)
    for p in (demos, prompts, cycles):
        p.add_argument("--n", type=int, default=200)
        p.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--split", choices=SPLITS, default="test")
    demos.add_argument(
        "--follower-share",
        type=float,
        default=0.0,
        help="share of rows that also carry a response, for the Follower template",
    )
    cycles.add_argument("--answers", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "demos":
        rows = demonstrations(args.n, seed=args.seed, follower_share=args.follower_share)
        print(write_jsonl(rows, args.out))
    elif args.command == "prompts":
        rows = [{"prompt": x} for x in sample_prompts(args.n, args.split, seed=args.seed)]
        print(write_jsonl(rows, args.out))
    else:
        share = demo_cycle_share(args.n, args.answers, seed=args.seed)
        print(json.dumps({"prompts": args.n, "answers": args.answers, "cycle_share": share}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
