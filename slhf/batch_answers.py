"""Refine another model's answers with ``slhf batch``, and score the result (docs/batch.md).

``python -m slhf.batch_answers build ANSWERS.jsonl -o BATCH.jsonl``: each answers line is
``{"id"?, "prompt": text or chat messages, "answer": text}`` (any model's); each batch line asks
``/v1/chat/completions`` to refine that answer (``refinement.response``: the first answer is the
given one, the Follower rounds refine it), ``custom_id`` = the line's ``id`` or its number.

``python -m slhf.batch_answers win-rate ANSWERS.jsonl RESULTS.jsonl --preference SPEC``: the
refined answers against the given ones under ``slhf eval``'s preference (``SPEC`` as for
``slhf eval --preference``: ``task:arith``, ``callable:MODULE:FUNCTION``, ``reward_model:PATH``,
``judge:BASE_URL:MODEL``): the win rate with its 95% Wilson interval, as ``slhf eval`` reports
it. Rows without a 200 in the results are counted and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slhf_models.serving.templates import Prompt


class AnswersError(ValueError):
    """An answers or results file that cannot be used; the message names the line."""


def read_answers(path: Path) -> list[tuple[str, Prompt, str]]:
    """(custom_id, prompt, answer) of each line of an answers file."""
    out: list[tuple[str, Prompt, str]] = []
    seen: set[str] = set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as e:
            raise AnswersError(f"{path}:{number}: not JSON: {e}") from None
        if not isinstance(row, dict):
            raise AnswersError(f"{path}:{number}: not a JSON object")
        prompt, answer = row.get("prompt"), row.get("answer")
        if not isinstance(prompt, str | list) or not prompt:
            raise AnswersError(f"{path}:{number}: 'prompt' must be a text or a list of messages")
        if not isinstance(answer, str) or not answer.strip():
            raise AnswersError(f"{path}:{number}: 'answer' must be a non-empty text")
        cid = str(row.get("id", number))
        if cid in seen:
            raise AnswersError(f"{path}:{number}: id {cid!r} appears twice")
        seen.add(cid)
        out.append((cid, prompt, answer))
    return out


def batch_lines(
    answers: Sequence[tuple[str, Prompt, str]], body: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The batch file's lines: each answer refined; ``body`` adds fields to every body (e.g.
    ``{"model": ..., "max_tokens": 64, "refinement": {"rounds": 2}}``)."""
    extra = dict(body or {})
    refinement = dict(extra.pop("refinement", {}))
    lines = []
    for cid, prompt, answer in answers:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        request = {
            "messages": messages,
            **extra,
            "refinement": {**refinement, "response": answer},
        }
        lines.append(
            {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": request}
        )
    return lines


def refined_answers(path: Path) -> tuple[dict[str, str], int]:
    """custom_id -> the refined answer of each 200 in a results file; and how many were not."""
    refined: dict[str, str] = {}
    failed = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(raw)
            response = record["response"]
            if response is None or response["status_code"] != 200:
                failed += 1
                continue
            refined[record["custom_id"]] = response["body"]["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise AnswersError(f"{path}:{number}: not a chat completion result: {e}") from None
    return refined, failed


def score(
    answers: Sequence[tuple[str, Prompt, str]], refined: dict[str, str], spec: str
) -> dict[str, Any]:
    """Win rate of the refined answers over the given ones under preference ``spec``."""
    from slhf_models.eval import win_rate
    from slhf_models.trainer.cli import build_preference

    pairs = [(p, refined[cid], a) for cid, p, a in answers if cid in refined]
    if not pairs:
        raise AnswersError("no answer of the answers file has a refined answer in the results")
    preference = build_preference(spec)
    prompts, ours, given = (list(x) for x in zip(*pairs, strict=True))
    result = asdict(
        win_rate("refined_vs_given", "refined", "given", preference(prompts, ours, given))
    )
    return {**result, "preference": spec, "missing": len(answers) - len(pairs)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slhf.batch_answers", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="answers file -> slhf batch input file")
    b.add_argument("answers", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--model", help="model id (default: the served model's, refined)")
    b.add_argument("--rounds", type=int, help="Follower rounds (default: the model's)")
    b.add_argument("--max-tokens", type=int, help="most tokens per round")
    b.add_argument("--seed", type=int, help="base seed; row i uses seed + i")
    b.add_argument("--trace", action="store_true", help="ask for every round (return_trace)")
    w = sub.add_parser("win-rate", help="refined vs given answers under a preference")
    w.add_argument("answers", type=Path)
    w.add_argument("results", type=Path, help="slhf batch's output")
    w.add_argument("--preference", required=True, help="as slhf eval --preference")
    args = p.parse_args(argv)
    try:
        answers = read_answers(args.answers)
        if args.command == "build":
            body: dict[str, Any] = {"refinement": {"return_trace": args.trace}}
            if args.rounds is not None:
                body["refinement"]["rounds"] = args.rounds
            for key in ("model", "max_tokens"):
                if getattr(args, key) is not None:
                    body[key] = getattr(args, key)
            lines = batch_lines(answers, body)
            if args.seed is not None:
                for i, line in enumerate(lines):
                    line["body"]["seed"] = args.seed + i
            args.output.write_text("".join(json.dumps(x) + "\n" for x in lines))
            print(f"{len(lines)} rows -> {args.output}", file=sys.stderr)
            return 0
        refined, failed = refined_answers(args.results)
        result = score(answers, refined, args.preference)
    except (AnswersError, OSError, ValueError) as e:
        print(f"slhf.batch_answers: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**result, "failed_rows": failed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
