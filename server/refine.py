"""The refinement loop (PAPER.md, "Inference-time refinement").

round 0:  the Leader answers ``T_L(x)`` -- or the answer is supplied by the caller ("given");
round i:  the Follower answers ``T_F(x, answer of round i-1)``: it sees the prompt and **only the
          previous answer**, never the history.

Stops after ``rounds`` Follower rounds ("max_rounds"), or early when a round returns the previous
answer unchanged ("unchanged"), or when the next Follower prompt no longer fits the context
("context_length"), or when the request's deadline passes ("deadline": the round in flight is
cancelled, which aborts it in the engine, and the best completed round is the answer; a deadline
that passes before the first answer is complete is a ``DeadlineExceededError``, 504).
Each round's seed is derived from the request's seed, so a seeded request is reproducible and
rounds do not share a random stream.

What a tokenizer or the engine rejects in a request (``slhf.server.errors.REQUEST_REJECTIONS``) is
turned into a 400 here, in ``prompt_ids`` and ``_run``, whatever the engine.

Written against the ``Engine`` protocol; many requests run this loop concurrently and batch in the
engine. Cancelling the task (client gone) cancels the in-flight engine request, which aborts it,
and no further round starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from slhf.models.serving.templates import Message, Role, TemplateRenderer
from slhf.server.errors import (
    REQUEST_REJECTIONS,
    DeadlineExceededError,
    InvalidRequestError,
    UpstreamError,
    request_rejected,
)
from slhf.server.generation import DraftCounts, Engine, FinishReason, Generation, GenerationParams
from slhf.server.prompts import Prompts
from slhf.server.protocol import LeaderAnswer, RoundResult, StoppedReason, Usage

MAX_CHARS_PER_TOKEN = 32
"""An upstream answer longer than ``max_model_len`` x this many characters cannot fit the
Follower's context in any tokenizer (a token is seldom more than a few characters): it is a 502
before it is tokenized, which would hold the event loop."""


def derive_seed(base: int | None, round_index: int) -> int | None:
    """Seed of round ``round_index`` (0 = Leader) from a request's base seed; None stays None."""
    if base is None:
        return None
    digest = hashlib.sha256(f"slhf:{base}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # non-negative int64


def choice_seed(base: int | None, choice: int) -> int | None:
    """Base seed of choice ``choice`` of an ``n``-choice request: choice 0 keeps ``base`` (so it
    matches the same request with ``n=1``); the others get their own, reproducible, seeds."""
    if base is None or choice == 0:
        return base
    digest = hashlib.sha256(f"slhf-choice:{base}:{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


T = TypeVar("T")


class _Expired(Exception):
    """The request's deadline passed while waiting for a generation (which was cancelled)."""


async def within(expires: float | None, work: Awaitable[T]) -> T:
    """``await work`` until the monotonic time ``expires``; then cancel it, raise ``_Expired``.

    Whether the deadline fired is asked of the timeout itself, never re-derived from the clock:
    uvloop's timers run on a cached millisecond clock and may fire a fraction of a millisecond
    before ``time.monotonic()`` reaches ``expires``."""
    if expires is None:
        return await work
    remaining = expires - time.monotonic()
    if remaining <= 0:
        if asyncio.iscoroutine(work):
            work.close()
        raise _Expired
    timeout = asyncio.timeout(remaining)
    try:
        async with timeout:
            return await work
    except TimeoutError:
        if timeout.expired():
            raise _Expired from None
        raise  # not ours


DeltaSink = Callable[[int, str], None]
"""Receives streamed text: ``sink(round_index, text_delta)`` (round 0 = the first answer)."""


class UpstreamLeader(Protocol):
    """Where the first answer comes from in upstream mode
    (``slhf.server.upstream.UpstreamClient``)."""

    async def answer(
        self, prompt: str | Sequence[Message], params: GenerationParams
    ) -> Generation: ...


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
    from_upstream: bool = False
    """Round 0 comes from the upstream server instead of the Leader (``leader.source`` =
    "upstream"); ignored when ``given_answer`` is set."""
    deadline_s: float | None = None
    """Seconds the whole refinement may take; None = no deadline."""


@dataclass(frozen=True)
class RefineOutcome:
    leader: LeaderAnswer
    rounds: list[RoundResult]
    stopped_reason: StoppedReason
    usage: Usage

    @property
    def final(self) -> str:
        return self.rounds[-1].text if self.rounds else self.leader.text


def same_answer(a: str, b: str) -> bool:
    """Whether a round left the answer unchanged (surrounding whitespace ignored)."""
    return a.strip() == b.strip()


class Refiner:
    """Runs refinement jobs on an engine with one template renderer per role."""

    def __init__(
        self,
        engine: Engine,
        renderers: dict[Role, TemplateRenderer],
        upstream: UpstreamLeader | None = None,
    ) -> None:
        self.engine = engine
        self.renderers = renderers
        self.upstream = upstream
        self.prompts = Prompts(engine, renderers)
        self.prompt_ids = self.prompts.ids
        self.check_fits = self.prompts.check_fits

    def _check_upstream_length(self, text: str) -> None:
        limit = self.engine.max_model_len("follower") * MAX_CHARS_PER_TOKEN
        if len(text) > limit:
            raise UpstreamError(
                f"the upstream answer has {len(text):,} characters; it cannot fit the "
                f"Follower's context of {limit // MAX_CHARS_PER_TOKEN:,} tokens (at most "
                f"{limit:,} characters are tokenized)",
                code="upstream_answer_too_long",
            )

    def first_prompt_ids(self, job: RefineJob) -> list[int] | None:
        """Validate the request's first prompt against the context before any work starts.

        Returns the first engine prompt, or None when the first answer comes from upstream (the
        Follower prompt is only known once it has answered).
        """
        if job.given_answer is not None:
            ids = self.prompt_ids("follower", job.prompt, job.given_answer)
            self.check_fits("follower", ids, param="response")
            return ids
        if job.from_upstream:
            if self.upstream is None:
                raise InvalidRequestError(
                    "the first answer was asked from the upstream server, but none is "
                    "configured; set SLHF_UPSTREAM_BASE_URL and SLHF_UPSTREAM_MODEL",
                    param="model",
                    code="upstream_not_configured",
                )
            self.check_fits("follower", self.prompt_ids("follower", job.prompt, ""))
            return None
        ids = self.prompt_ids("leader", job.prompt, None)
        self.check_fits("leader", ids)
        return ids

    async def _run(
        self,
        role: Role,
        ids: list[int],
        params: GenerationParams,
        round_index: int,
        job: RefineJob,
        sink: DeltaSink | None,
    ) -> tuple[Generation, float]:
        room = self.engine.max_model_len(role) - len(ids)
        params = replace(
            params,
            max_tokens=min(params.max_tokens, room),
            seed=derive_seed(params.seed, round_index),
        )
        request_id = f"{job.request_id}-{round_index}"
        start = time.perf_counter()
        try:
            if sink is None:
                gen = await self.engine.generate(role, ids, params, request_id)
            else:
                gen = await self._stream(role, ids, params, request_id, round_index, sink)
        except REQUEST_REJECTIONS as e:
            raise request_rejected(e, f"the {role} engine") from e
        return gen, (time.perf_counter() - start) * 1000.0

    async def _stream(
        self,
        role: Role,
        ids: list[int],
        params: GenerationParams,
        request_id: str,
        round_index: int,
        sink: DeltaSink,
    ) -> Generation:
        parts: list[str] = []
        token_ids: list[int] | None = []
        tokens, cached = 0, None
        drafts: DraftCounts | None = None
        finish: FinishReason = "stop"
        async for delta in self.engine.stream(role, ids, params, request_id):
            if delta.text:
                parts.append(delta.text)
                sink(round_index, delta.text)
            tokens += delta.new_tokens
            finish = delta.finish_reason or finish
            token_ids = None if token_ids is None or delta.token_ids is None else token_ids
            if token_ids is not None and delta.token_ids is not None:
                token_ids.extend(delta.token_ids)
            cached = delta.cached_tokens if delta.cached_tokens is not None else cached
            drafts = delta.drafts or drafts
        answer_ids = None if token_ids is None else tuple(token_ids)
        return Generation("".join(parts), len(ids), tokens, finish, answer_ids, cached, drafts)

    async def _first_answer(
        self, job: RefineJob, sink: DeltaSink | None, expires: float | None
    ) -> tuple[LeaderAnswer, list[int] | None, list[int] | None]:
        """Round 0, the first Follower prompt when already known, and the Leader's prompt ids
        (None when the Leader did not answer)."""
        try:
            return await within(expires, self._first_answer_now(job, sink))
        except _Expired:
            raise DeadlineExceededError(
                f"the deadline of {job.deadline_s:g} s passed before the first answer was "
                "complete; ask for a longer deadline_s or fewer max_tokens",
                param="deadline_s",
                code="deadline_exceeded",
            ) from None

    async def _first_answer_now(
        self, job: RefineJob, sink: DeltaSink | None
    ) -> tuple[LeaderAnswer, list[int] | None, list[int] | None]:
        first_ids = self.first_prompt_ids(job)
        if job.given_answer is not None:
            given = LeaderAnswer(
                text=job.given_answer,
                source="given",
                finish_reason=None,
                usage=Usage(),
                latency_ms=0.0,
            )
            return given, first_ids, None
        if first_ids is None:
            assert self.upstream is not None  # checked by first_prompt_ids
            start = time.perf_counter()
            gen = await self.upstream.answer(
                job.prompt, replace(job.leader, seed=derive_seed(job.leader.seed, 0))
            )
            self._check_upstream_length(gen.text)
            ms, source, next_ids = (time.perf_counter() - start) * 1000.0, "upstream", None
        else:
            gen, ms = await self._run("leader", first_ids, job.leader, 0, job, sink)
            source = "leader"
            next_ids = self.prompts.follower_ids(job.prompt, gen.text, first_ids, gen.token_ids)
        answer = LeaderAnswer(
            text=gen.text,
            source=source,  # type: ignore[arg-type]
            finish_reason=gen.finish_reason,
            usage=Usage.of(gen),
            latency_ms=round(ms, 3),
        )
        return answer, next_ids, first_ids if source == "leader" else None

    async def refine(
        self, job: RefineJob, sink: DeltaSink | None = None, stream_rounds: bool = False
    ) -> RefineOutcome:
        """Run ``job``. With a ``sink``, stream the last scheduled round (every round with
        ``stream_rounds``); when the loop stops before its last scheduled round, or the final
        answer was not generated here (given, upstream), the final answer is sent in one piece
        once known -- so the streamed text of the final round is always the final answer."""

        def streamed(i: int) -> DeltaSink | None:
            return sink if stream_rounds or i == job.rounds else None

        expires = None if job.deadline_s is None else time.monotonic() + job.deadline_s
        leader, next_ids, leader_ids = await self._first_answer(job, streamed(0), expires)
        if sink is not None and stream_rounds and leader.source != "leader":
            sink(0, leader.text)
        rounds, stopped = await self._follow(
            job, leader.text, next_ids, leader_ids, expires, streamed
        )
        outcome = RefineOutcome(
            leader=leader,
            rounds=rounds,
            stopped_reason=stopped,
            usage=sum((r.usage for r in rounds), leader.usage),
        )
        if sink is not None:
            final_index = rounds[-1].round if rounds else 0
            # A deadline that cut a streamed round leaves its partial text sent: no resend.
            cut_streamed = stopped == "deadline" and streamed(final_index + 1) is not None
            was_streamed = (
                stream_rounds
                or cut_streamed
                or (final_index == job.rounds and (final_index > 0 or leader.source == "leader"))
            )
            if not was_streamed and outcome.final:
                sink(final_index, outcome.final)
        return outcome

    async def _follow(
        self,
        job: RefineJob,
        previous: str,
        next_ids: list[int] | None,
        leader_ids: list[int] | None,
        expires: float | None,
        streamed: Callable[[int], DeltaSink | None],
    ) -> tuple[list[RoundResult], StoppedReason]:
        """The Follower rounds after the first answer ``previous``, and why they stopped.

        ``next_ids`` is round 1's prompt when already built; later prompts are spliced from
        ``leader_ids`` and the previous round's ids where they can be (``slhf.server.prompts``)."""
        rounds: list[RoundResult] = []
        previous_ids: tuple[int, ...] | None = None
        for i in range(1, job.rounds + 1):
            if next_ids is not None:
                ids = next_ids
            else:
                ids = self.prompts.follower_ids(job.prompt, previous, leader_ids, previous_ids)
            next_ids = None
            if len(ids) >= self.engine.max_model_len("follower"):
                return rounds, "context_length"
            try:
                gen, ms = await within(
                    expires, self._run("follower", ids, job.follower, i, job, streamed(i))
                )
            except _Expired:
                return rounds, "deadline"
            rounds.append(
                RoundResult(
                    round=i,
                    text=gen.text,
                    finish_reason=gen.finish_reason,
                    usage=Usage.of(gen),
                    latency_ms=round(ms, 3),
                )
            )
            if job.stop_when_unchanged and same_answer(gen.text, previous):
                return rounds, "unchanged"
            previous, previous_ids = gen.text, gen.token_ids
        return rounds, "max_rounds"
