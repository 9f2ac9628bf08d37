"""The refinement loop (docs/algorithm.md, "Inference-time refinement").

round 0:  the Leader answers ``T_L(x)`` -- or the answer is supplied by the caller ("given"), or by
          the upstream server ("upstream");
round i:  the Follower answers ``T_F(x, answer of round i-1)``: it sees the prompt and **only the
          previous answer**, never the history.

Stops after ``rounds`` Follower rounds ("max_rounds"), or early when a round returns the previous
answer unchanged ("unchanged"), or when the next Follower prompt no longer fits the context
("context_length"), or when the request's deadline passes ("deadline": the round in flight is
cancelled, which aborts it in the engine, and the best completed round is the answer; a deadline
that passes before the first answer is complete is a ``DeadlineExceededError``, 504).
Each round's seed is derived from the request's seed, so a seeded request is reproducible and
rounds do not share a random stream.

``Refiner.rounds`` yields the rounds as they complete -- the first answer, each Follower round,
then why it stopped (``Stopped``); ``Refiner.refine`` collects them into a ``RefineOutcome``. A
round may stream its text as it is generated (``LiveRounds``); which rounds do, and what else a
stream sends, is the streaming module's policy (``slhf_server.openai_stream``).

What a tokenizer or the engine rejects in a request (``slhf_server.errors.REQUEST_REJECTIONS``) is
turned into a 400 (in ``slhf_server.prompts`` and ``_generate``), whatever the engine.

Written against the ``Engine`` protocol; many requests run this loop concurrently and batch in the
engine. Cancelling the task (client gone) cancels the in-flight engine request, which aborts it,
and no further round starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, Protocol, TypeVar

from slhf_models.serving.templates import Message, Role, TemplateRenderer
from slhf_server import tracing
from slhf_server.engine import (
    DraftCounts,
    Engine,
    EngineError,
    FinishReason,
    Generation,
    GenerationParams,
    TokenLogprob,
)
from slhf_server.errors import (
    REQUEST_REJECTIONS,
    DeadlineExceededError,
    InvalidRequestError,
    PromptTooLongError,
    SLHFError,
    UpstreamError,
    request_rejected,
)
from slhf_server.prompts import Prompts
from slhf_server.protocol import (
    LeaderAnswer,
    LogprobEntry,
    RoundResult,
    StoppedReason,
    Usage,
    logprob_entries,
)

MAX_CHARS_PER_TOKEN = 32
"""For a tokenizer without a ``TokenBound`` (``slhf_server.token_bound``): an upstream answer
longer than ``max_model_len`` x this many characters is taken not to fit the Follower's context (a
token is seldom more than a few characters) and is a 502 before it is tokenized. With a bound, the
bound decides."""


def derive_seed(base: int | None, round_index: int) -> int | None:
    """Seed of round ``round_index`` (0 = Leader) from a request's base seed; None stays None."""
    if base is None:
        return None
    digest = hashlib.sha256(f"slhf:{base}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # non-negative int64


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


class DeltaSink(Protocol):
    """Receives streamed text: ``sink(round_index, text_delta)`` (round 0 = the first answer);
    ``logprobs`` (the delta's tokens) is passed only when the request asked for them."""

    def __call__(
        self,
        round_index: int,
        text: str,
        logprobs: Sequence[TokenLogprob | LogprobEntry] | None = None,
    ) -> None: ...


LiveRounds = Callable[[int], DeltaSink | None]
"""Which rounds stream their text as it is generated: ``live(i)`` is where round ``i``'s text
goes, None = round ``i`` is generated whole."""


class UpstreamLeader(Protocol):
    """Where the first answer comes from in upstream mode
    (``slhf_server.upstream.UpstreamClient``)."""

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
    first_answer_final: bool = True
    """Whether the chain may end on its first answer. False when the Follower's rounds are
    constrained to an output format the first answer was not generated under: a deadline or a
    context too short before round 1 completes is then an error, never that answer
    (``slhf_server.plan.first_answer_final``)."""
    opened: dict[str, OpeningPrompts] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    """The opening prompts once ``Refiner.check_opening`` has built them (the loop then reuses
    them instead of rendering and tokenizing the same prompt again)."""


@dataclass(frozen=True)
class Stopped:
    """The loop's last step: why it stopped."""

    reason: StoppedReason


Step = LeaderAnswer | RoundResult | Stopped
"""What the loop yields: the first answer (round 0), each Follower round, then ``Stopped``."""


@dataclass(frozen=True)
class RefineOutcome:
    leader: LeaderAnswer
    rounds: list[RoundResult]
    stopped_reason: StoppedReason
    usage: Usage

    @property
    def final(self) -> str:
        return self.rounds[-1].text if self.rounds else self.leader.text

    @classmethod
    def of(cls, steps: Sequence[Step]) -> RefineOutcome:
        """The outcome of a finished loop from the steps it yielded."""
        leader, stop = steps[0], steps[-1]
        assert isinstance(leader, LeaderAnswer) and isinstance(stop, Stopped)
        rounds = [step for step in steps if isinstance(step, RoundResult)]
        return cls(leader, rounds, stop.reason, sum((r.usage for r in rounds), leader.usage))


@dataclass(frozen=True)
class OpeningPrompts:
    """The engine prompts known before the first answer, each checked against its context."""

    leader: list[int] | None
    """The Leader's prompt ``T_L(x)``; None when the first answer is given or from upstream."""
    follower: list[int] | None
    """Round 1's prompt ``T_F(x, y)`` when the first answer ``y`` is given; None otherwise (it
    is built once the first answer is known)."""


class _FirstAnswer(NamedTuple):
    answer: LeaderAnswer
    answer_ids: tuple[int, ...] | None
    """The Leader's generated ids (``Generation.token_ids``); None for a given or upstream one."""
    prompts: OpeningPrompts


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

    def check_source(self, job: RefineJob) -> None:
        """A 400 for an upstream first answer when no upstream is configured (cheap: planning
        calls it for every job)."""
        if job.given_answer is None and job.from_upstream and self.upstream is None:
            raise InvalidRequestError(
                "the first answer was asked from the upstream server, but none is "
                "configured; set SLHF_UPSTREAM_BASE_URL and SLHF_UPSTREAM_MODEL",
                param="model",
                code="upstream_not_configured",
            )

    async def check_opening(self, jobs: Sequence[RefineJob]) -> None:
        """Every distinct prompt of ``jobs`` checked against the context (``opening_prompts``),
        before admission, so a request that cannot run costs nothing."""
        seen: list[tuple[RefineJob, OpeningPrompts]] = []
        for job in jobs:
            same = next(
                (
                    opened
                    for j, opened in seen
                    if (j.prompt is job.prompt or j.prompt == job.prompt)
                    and j.given_answer == job.given_answer
                    and j.from_upstream == job.from_upstream
                ),
                None,
            )
            if same is None:
                same = await self.opening_prompts(job)
                seen.append((job, same))
            job.opened["prompts"] = same

    async def opening_prompts(self, job: RefineJob) -> OpeningPrompts:
        """The prompts known before the first answer, checked against the context: a prompt
        that leaves no room to generate is a 400 (``PromptTooLongError``), and so is an upstream
        first answer when no upstream is configured. Rendered and tokenized off the event loop
        (``slhf_server.prompts``); checked before admission (``check_opening``, which keeps
        them on the job for the loop), or when the loop starts."""
        self.check_source(job)
        if job.given_answer is not None:
            ids = await self.prompts.ids("follower", job.prompt, job.given_answer, "response")
            return OpeningPrompts(leader=None, follower=ids)
        if job.from_upstream:
            # the upstream answer is not known yet: the prompt must fit with an empty one
            await self.prompts.ids("follower", job.prompt, "")
            return OpeningPrompts(leader=None, follower=None)
        ids = await self.prompts.ids("leader", job.prompt, None)
        return OpeningPrompts(leader=ids, follower=None)

    async def refine(self, job: RefineJob, live: LiveRounds | None = None) -> RefineOutcome:
        """Run ``job`` to its end: the first answer, the Follower rounds and why they stopped."""
        return RefineOutcome.of([step async for step in self.rounds(job, live)])

    async def rounds(self, job: RefineJob, live: LiveRounds | None = None) -> AsyncIterator[Step]:
        """The loop: yields the first answer, each Follower round as it completes, then
        ``Stopped``. With ``live``, a round's text streams as it is generated."""
        expires = None if job.deadline_s is None else time.monotonic() + job.deadline_s
        first = await self._first_answer(job, live, expires)
        yield first.answer
        previous, previous_ids = first.answer.text, first.answer_ids
        for i in range(1, job.rounds + 1):
            if i == 1 and first.prompts.follower is not None:
                ids = first.prompts.follower
            else:  # spliced from the Leader's sequence where it can be (slhf_server.prompts)
                try:
                    ids = await within(
                        expires,
                        self.prompts.follower_ids(
                            job.prompt, previous, first.prompts.leader, previous_ids
                        ),
                    )
                except PromptTooLongError as e:
                    if i == 1 and not job.first_answer_final:
                        raise PromptTooLongError(
                            "the first answer leaves no room in the Follower's context for a "
                            f"round in the requested format ({e})",
                            param="response_format",
                        ) from e
                    yield Stopped("context_length")
                    return
                except _Expired:
                    yield Stopped("deadline")
                    return
            try:
                gen, ms = await within(
                    expires, self._generate("follower", ids, job.follower, i, job, live)
                )
            except _Expired:
                if i == 1 and not job.first_answer_final:
                    raise DeadlineExceededError(
                        f"the deadline of {job.deadline_s:g} s passed before an answer in the "
                        "requested format was complete; ask for a longer deadline_s",
                        param="deadline_s",
                        code="deadline_exceeded",
                    ) from None
                yield Stopped("deadline")
                return
            yield RoundResult(
                round=i,
                text=gen.text,
                finish_reason=gen.finish_reason,
                usage=Usage.of(gen),
                latency_ms=round(ms, 3),
                logprobs=logprob_entries(gen),
                output_format=_format_kind(job.follower),
            )
            if job.stop_when_unchanged and same_answer(gen.text, previous):
                yield Stopped("unchanged")
                return
            previous, previous_ids = gen.text, gen.token_ids
        yield Stopped("max_rounds")

    async def _first_answer(
        self, job: RefineJob, live: LiveRounds | None, expires: float | None
    ) -> _FirstAnswer:
        """Round 0 within the deadline; a deadline that passes first is a 504."""
        try:
            return await within(expires, self._first_answer_now(job, live))
        except _Expired:
            raise DeadlineExceededError(
                f"the deadline of {job.deadline_s:g} s passed before the first answer was "
                "complete; ask for a longer deadline_s or fewer max_tokens",
                param="deadline_s",
                code="deadline_exceeded",
            ) from None

    async def _first_answer_now(self, job: RefineJob, live: LiveRounds | None) -> _FirstAnswer:
        prompts = job.opened.get("prompts") or await self.opening_prompts(job)
        if job.given_answer is not None:
            given = LeaderAnswer(
                text=job.given_answer,
                source="given",
                finish_reason=None,
                usage=Usage(),
                latency_ms=0.0,
            )
            return _FirstAnswer(given, None, prompts)
        if prompts.leader is None:
            assert self.upstream is not None  # checked by opening_prompts
            start = time.perf_counter()
            gen = await self.upstream.answer(
                job.prompt, replace(job.leader, seed=derive_seed(job.leader.seed, 0))
            )
            text = gen.text  # measured in the tokenizer's thread: normalizing is CPU work
            await self.prompts.off_loop("follower", lambda: self._check_upstream_length(text))
            ms, source, answer_ids = (time.perf_counter() - start) * 1000.0, "upstream", None
        else:
            gen, ms = await self._generate("leader", prompts.leader, job.leader, 0, job, live)
            source, answer_ids = "leader", gen.token_ids
        answer = LeaderAnswer(
            text=gen.text,
            source=source,
            finish_reason=gen.finish_reason,
            usage=Usage.of(gen),
            latency_ms=round(ms, 3),
            logprobs=logprob_entries(gen) if source == "leader" else None,
            output_format=_format_kind(job.leader) if source == "leader" else None,
        )
        return _FirstAnswer(answer, answer_ids, prompts)

    def _check_upstream_length(self, text: str) -> None:
        """A 502 for an upstream answer that cannot fit the Follower's context, by its length
        alone (``slhf_server.token_bound``; ``MAX_CHARS_PER_TOKEN`` without a bound)."""
        context = self.engine.max_model_len("follower")
        bound = self.prompts.bounds["follower"]
        if bound is None:
            cannot = len(text) > context * MAX_CHARS_PER_TOKEN
        else:
            cannot = bound.min_tokens(text) >= context
        if cannot:
            raise UpstreamError(
                f"the upstream answer has {len(text):,} characters; it cannot fit the "
                f"Follower's context of {context:,} tokens",
                code="upstream_answer_too_long",
            )

    async def _generate(
        self,
        role: Role,
        ids: list[int],
        params: GenerationParams,
        round_index: int,
        job: RefineJob,
        live: LiveRounds | None,
    ) -> tuple[Generation, float]:
        """One generation of round ``round_index`` (its seed derived, ``max_tokens`` capped by
        the room the context leaves), and its latency in ms; streamed when ``live`` says so."""
        room = self.engine.max_model_len(role) - len(ids)
        params = replace(
            params,
            max_tokens=min(params.max_tokens, room),
            seed=derive_seed(params.seed, round_index),
        )
        request_id = f"{job.request_id}-{round_index}"
        sink = live(round_index) if live is not None else None
        start = time.perf_counter()
        with tracing.round_span(role, round_index, request_id, len(ids), params) as span:
            try:
                if sink is None:
                    gen = await self.engine.generate(role, ids, params, request_id)
                else:
                    gen = await self._stream(role, ids, params, request_id, round_index, sink)
            except REQUEST_REJECTIONS as e:
                raise request_rejected(e, f"the {role} engine") from e
            except (EngineError, SLHFError):
                raise
            except Exception as e:  # not the engine's own error: still the engine failing (503)
                raise EngineError(
                    f"the {role} engine failed the request: {type(e).__name__}: {e}"
                ) from e
            if span is not None:
                tracing.record_generation(span, gen)
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
        logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        finish: FinishReason = "stop"
        async for delta in self.engine.stream(role, ids, params, request_id):
            if logprobs is not None and delta.logprobs:
                logprobs.extend(delta.logprobs)
            if delta.text:
                parts.append(delta.text)
                if delta.logprobs is None:
                    sink(round_index, delta.text)
                else:
                    sink(round_index, delta.text, delta.logprobs)
            tokens += delta.new_tokens
            finish = delta.finish_reason or finish
            token_ids = None if token_ids is None or delta.token_ids is None else token_ids
            if token_ids is not None and delta.token_ids is not None:
                token_ids.extend(delta.token_ids)
            cached = delta.cached_tokens if delta.cached_tokens is not None else cached
            drafts = delta.drafts or drafts
        answer_ids = None if token_ids is None else tuple(token_ids)
        return Generation(
            "".join(parts),
            len(ids),
            tokens,
            finish,
            answer_ids,
            cached,
            drafts,
            None if logprobs is None else tuple(logprobs),
        )


def _format_kind(params: GenerationParams) -> Literal["json_object", "json_schema"] | None:
    return None if params.output_format is None else params.output_format.kind
