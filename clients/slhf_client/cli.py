"""``slhf refine "question"``: ask a server for a refined answer and show how it got there.

Prints the Leader answer (or the given one), then each Follower round as a word-level diff
against the round before, then why refinement stopped. ``--stream`` streams every round as it is
generated (the OpenAI route with ``refinement.stream_rounds``) and prints the changes after each
round. ``--json-schema FILE`` / ``--json-object`` constrain the answer (structured outputs);
``--logprobs`` shows each step's mean token log-probability. The server comes from ``--url`` /
``SLHF_BASE_URL``, the key from ``--api-key`` / ``SLHF_API_KEY``. Exit status: 0 done, 1 the
server refused or failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .client import Client
from .errors import APIStatusError, SLHFClientError
from .render import change_summary, dim, header, use_color, word_diff
from .types import LeaderAnswer, Refinement, RefinementTrace, Round


def add_refine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help='the question ("-" reads it from stdin)')
    p.add_argument("--rounds", "-k", type=int, help="Follower rounds (default: the model's)")
    p.add_argument(
        "--response-file",
        type=Path,
        help='refine this answer instead of a Leader answer ("-" reads stdin)',
    )
    p.add_argument("--stream", action="store_true", help="stream every round as it is generated")
    p.add_argument("--model", help="model id (default: the server's model)")
    p.add_argument("--max-tokens", type=int, help="max tokens per generation")
    p.add_argument("--temperature", type=float, help="sampling temperature for every round")
    p.add_argument("--seed", type=int, help="base seed (reproducible rounds)")
    answer = p.add_mutually_exclusive_group()
    answer.add_argument(
        "--json-schema",
        type=Path,
        metavar="FILE",
        help="the answer must be JSON matching the JSON schema in FILE (structured outputs)",
    )
    answer.add_argument(
        "--json-object", action="store_true", help="the answer must be a JSON object"
    )
    p.add_argument(
        "--logprobs",
        action="store_true",
        help="ask for token log-probabilities and show each step's mean",
    )
    p.add_argument("--json", action="store_true", help="print the raw /v1/refine JSON instead")
    p.add_argument("--url", help="server base URL (SLHF_BASE_URL; default http://localhost:8000)")
    p.add_argument("--api-key", help="API key (SLHF_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def _read(source: str | Path) -> str:
    return sys.stdin.read() if str(source) == "-" else Path(source).read_text()


def run_refine(
    args: argparse.Namespace, client: Client | None = None, out: TextIO | None = None
) -> int:
    """Run ``slhf refine``; tests pass a ``client`` bound to an in-process app."""
    out = out or sys.stdout
    try:
        question = _read(args.question) if args.question == "-" else args.question
        response = _read(args.response_file) if args.response_file else None
        response_format = _response_format(args)
    except (OSError, ValueError) as e:
        print(f"slhf refine: cannot read input: {e}", file=sys.stderr)
        return 2
    own = client is None
    client = client or Client(args.url, args.api_key, timeout=args.timeout)
    try:
        if args.stream:
            _stream(client, args, question, response, response_format, out)
        else:
            r = client.refine(
                question,
                rounds=args.rounds,
                response=response,
                model=args.model,
                seed=args.seed,
                leader=_sampling(args),
                follower=_sampling(args),
                response_format=response_format,
                logprobs=args.logprobs or None,
            )
            if args.json:
                print(json.dumps(r.raw, indent=2), file=out)
            else:
                show_refinement(r, out, use_color(out))
    except APIStatusError as e:
        where = f" ({e.param})" if e.param else ""
        status = f" {e.status_code}" if e.status_code else ""
        print(f"slhf refine: server error{status}{where}: {e.message}", file=sys.stderr)
        return 1
    except SLHFClientError as e:
        print(f"slhf refine: {e}", file=sys.stderr)
        return 1
    finally:
        if own:
            client.close()
    return 0


def _sampling(args: argparse.Namespace) -> dict[str, object] | None:
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    params = {k: v for k, v in params.items() if v is not None}
    return params or None


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--json-schema FILE`` / ``--json-object`` as a ``response_format``."""
    if args.json_schema is not None:
        schema = json.loads(_read(args.json_schema))
        name = Path(args.json_schema).stem or "answer"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    return {"type": "json_object"} if args.json_object else None


def _notes(step: LeaderAnswer | Round) -> str:
    """What a step says besides its tokens: its format, its tokens' mean log-probability."""
    notes = [step.output_format] if step.output_format else []
    if step.logprobs:
        mean = sum(t.logprob for t in step.logprobs) / len(step.logprobs)
        notes.append(f"mean logprob {mean:.3f}")
    return "".join(f" · {n}" for n in notes)


def show_refinement(r: RefinementTrace, out: TextIO, color: bool) -> None:
    """The Leader answer, then each round as a word diff against the previous one."""
    lead = r.leader
    title = "Leader" if lead.source == "leader" else f"Answer ({lead.source})"
    tokens = f"{lead.usage.completion_tokens} tokens"
    print(header(f"{title} · {tokens}{_notes(lead)}", color), file=out)
    print(lead.text.strip() or dim("(empty)", color), file=out)
    previous = lead.text
    for rnd in r.rounds:
        diff = word_diff(previous, rnd.text, color)
        what = "unchanged" if diff.unchanged else f"+{diff.added} -{diff.removed} words"
        stats = f"{rnd.usage.completion_tokens} tokens, {rnd.latency_ms:.0f} ms{_notes(rnd)}"
        print("", file=out)
        print(header(f"Round {rnd.round} · {what} · {stats}", color), file=out)
        print(diff.text.strip() or dim("(empty)", color), file=out)
        previous = rnd.text
    _footer(r, out, color)


def _footer(r: RefinementTrace, out: TextIO, color: bool) -> None:
    line = f"stopped: {r.stopped_reason} after {len(r.rounds)} round(s)"
    if isinstance(r, Refinement):
        line += f" · {r.usage.total_tokens} tokens in all · model {r.model}"
    print("", file=out)
    print(dim(line, color), file=out)


def _stream(
    client: Client,
    args: argparse.Namespace,
    question: str,
    response: str | None,
    response_format: dict[str, Any] | None,
    out: TextIO,
) -> None:
    """Print each round's text as it streams; after a round ends, what changed."""
    color = use_color(out)
    texts: dict[int, str] = {}
    current: int | None = None
    trace: RefinementTrace | None = None

    def end_round() -> None:
        if current is None:
            return
        print("", file=out)
        prev = texts.get(current - 1, response if current == 1 else None)
        if current > 0 and prev is not None:
            print(change_summary(word_diff(prev, texts[current], color), color), file=out)

    chunks = client.chat_stream(
        question,
        model=args.model,
        rounds=args.rounds,
        response=response,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        return_trace=True,
        stream_rounds=True,
        extra={
            k: v
            for k, v in (("response_format", response_format), ("logprobs", args.logprobs))
            if v
        },
    )
    for chunk in chunks:
        if chunk.index != 0:
            continue
        if chunk.round != current and chunk.text:
            end_round()
            current = chunk.round
            texts[current] = ""
            first = "Leader" if response is None else "Answer (given)"
            title = first if current == 0 else f"Round {current}"
            print(("\n" if current else "") + header(title, color), file=out)
        if chunk.text and current is not None:
            texts[current] += chunk.text
            out.write(chunk.text)
            out.flush()
        if chunk.refinement is not None:
            trace = chunk.refinement
    end_round()
    if trace is not None:
        print("", file=out)
        steps: list[LeaderAnswer | Round] = [trace.leader, *trace.rounds]
        for i, step in enumerate(steps):
            if _notes(step):  # the formats and logprobs, known from the trace
                print(dim(f"round {i}{_notes(step)}", color), file=out)
        line = f"stopped: {trace.stopped_reason} after {len(trace.rounds)} round(s)"
        print(dim(line, color), file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slhf refine", description=(__doc__ or "").split("\n\n")[0].strip()
    )
    add_refine_arguments(parser)
    return run_refine(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
