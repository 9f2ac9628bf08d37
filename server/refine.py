"""The refinement loop (PAPER.md, "Inference-time refinement").

round 0:  the Leader answers ``T_L(x)`` -- or the answer is supplied by the caller ("given");
round i:  the Follower answers ``T_F(x, answer of round i-1)``: it sees the prompt and **only the
          previous answer**, never the history.

Stops after ``rounds`` Follower rounds ("max_rounds"), or early when a round returns the previous
answer unchanged ("unchanged"), or when the next Follower prompt no longer fits the context
("context_length"). Each round's seed is derived from the request's seed, so a seeded request is
reproducible and rounds do not share a random stream.

Written against the ``Engine`` protocol; many requests run this loop concurrently and batch in the
engine. Cancelling the task (client gone) cancels the in-flight engine request, which aborts it,
and no further round starts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from models.templates import Message, Role, TemplateRenderer
from server.errors import PromptTooLongError
from server.generation import Engine, Generation, GenerationParams
from server.protocol import LeaderAnswer, RoundResult, StoppedReason, Usage


def derive_seed(base: int | None, round_index: int) -> int | None:
    """Seed of round ``round_index`` (0 = Leader) from a request's base seed; None stays None."""
    if base is None:
        return None
    digest = hashlib.sha256(f"slhf:{base}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # non-negative int64


@dataclass(frozen=True)
class RefineJob:
    """One refinement request, validated and resolved to engine parameters."""

    request_id: str
    prompt: str | Sequence[Message]
    rounds: int
    leader: GenerationParams
    follower: GenerationParams
    given_answer: str | None = None
    stop_when_unchanged: bool = True


@dataclass(frozen=True)
class RefineOutcome:
    leader: LeaderAnswer
    rounds: list[RoundResult]
    stopped_reason: StoppedReason
    usage: Usage

    @property
    def final(self) -> str:
        return self.rounds[-1].text if self.rounds else self.leader.text


def _usage(g: Generation) -> Usage:
    return Usage(
        prompt_tokens=g.prompt_tokens,
        completion_tokens=g.completion_tokens,
        total_tokens=g.prompt_tokens + g.completion_tokens,
    )


def _sum_usage(parts: Sequence[Usage]) -> Usage:
    p = sum(u.prompt_tokens for u in parts)
    c = sum(u.completion_tokens for u in parts)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def same_answer(a: str, b: str) -> bool:
    """Whether a round left the answer unchanged (surrounding whitespace ignored)."""
    return a.strip() == b.strip()


class Refiner:
    """Runs refinement jobs on an engine with one template renderer per role."""

    def __init__(self, engine: Engine, renderers: dict[Role, TemplateRenderer]) -> None:
        self.engine = engine
        self.renderers = renderers

    def prompt_ids(
        self, role: Role, prompt: str | Sequence[Message], answer: str | None
    ) -> list[int]:
        return self.renderers[role].encode_role(role, prompt, answer)

    def check_fits(self, role: Role, ids: list[int], param: str = "prompt") -> None:
        """Raise ``PromptTooLongError`` when ``ids`` leave no room for a single new token."""
        limit = self.engine.max_model_len(role)
        if len(ids) >= limit:
            what = (
                "Leader prompt"
                if role == "leader"
                else "Follower prompt (prompt + answer + instruction)"
            )
            raise PromptTooLongError(
                f"{what} has {len(ids):,} tokens; max_model_len is {limit:,}, which leaves no "
                f"room to generate. Shorten the {param}.",
                param=param,
            )

    def first_prompt_ids(self, job: RefineJob) -> list[int]:
        """Validate the request's first prompt against the context before any work starts."""
        if job.given_answer is None:
            ids = self.prompt_ids("leader", job.prompt, None)
            self.check_fits("leader", ids)
        else:
            ids = self.prompt_ids("follower", job.prompt, job.given_answer)
            self.check_fits("follower", ids, param="response")
        return ids

    async def _run(
        self, role: Role, ids: list[int], params: GenerationParams, round_index: int, job: RefineJob
    ) -> tuple[Generation, float]:
        room = self.engine.max_model_len(role) - len(ids)
        params = replace(
            params,
            max_tokens=min(params.max_tokens, room),
            seed=derive_seed(params.seed, round_index),
        )
        start = time.perf_counter()
        gen = await self.engine.generate(role, ids, params, f"{job.request_id}-{round_index}")
        return gen, (time.perf_counter() - start) * 1000.0

    async def refine(self, job: RefineJob) -> RefineOutcome:
        first_ids = self.first_prompt_ids(job)
        if job.given_answer is None:
            gen, ms = await self._run("leader", first_ids, job.leader, 0, job)
            leader = LeaderAnswer(
                text=gen.text,
                source="leader",
                finish_reason=gen.finish_reason,
                usage=_usage(gen),
                latency_ms=round(ms, 3),
            )
            next_ids: list[int] | None = None
        else:
            leader = LeaderAnswer(
                text=job.given_answer,
                source="given",
                finish_reason=None,
                usage=Usage(),
                latency_ms=0.0,
            )
            next_ids = first_ids

        rounds: list[RoundResult] = []
        stopped: StoppedReason = "max_rounds"
        previous = leader.text
        for i in range(1, job.rounds + 1):
            ids = (
                next_ids
                if next_ids is not None
                else self.prompt_ids("follower", job.prompt, previous)
            )
            next_ids = None
            if len(ids) >= self.engine.max_model_len("follower"):
                stopped = "context_length"
                break
            gen, ms = await self._run("follower", ids, job.follower, i, job)
            rounds.append(
                RoundResult(
                    round=i,
                    text=gen.text,
                    finish_reason=gen.finish_reason,
                    usage=_usage(gen),
                    latency_ms=round(ms, 3),
                )
            )
            if job.stop_when_unchanged and same_answer(gen.text, previous):
                stopped = "unchanged"
                break
            previous = gen.text
        usage = _sum_usage([leader.usage, *(r.usage for r in rounds)])
        return RefineOutcome(leader=leader, rounds=rounds, stopped_reason=stopped, usage=usage)
