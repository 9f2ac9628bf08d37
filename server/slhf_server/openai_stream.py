"""Streaming OpenAI responses: refinement events as Server-Sent Events in OpenAI chunk format.

The streaming policy (``stream_choice``) lives here, not in the loop: earlier rounds are computed
first; the final round's tokens stream as they are generated (every round with
``refinement.stream_rounds``; each content chunk carries ``choices[i].round``). When a choice
stops before its last scheduled round ("unchanged", "context_length"), or its final answer was
not generated here (a given or upstream answer with 0 rounds), the final answer is sent as one
chunk once known: the concatenated content of a choice is always its final answer (with
``stream_rounds``: the content of its last round). A failure after the stream started sends one
``{"error": {...}}`` event (``slhf_server.errors.error_body``), then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from slhf_server.engine import TokenLogprob
from slhf_server.errors import domain_error, error_body
from slhf_server.openai_protocol import CompletionLogprobs
from slhf_server.openai_response import final_logprobs, finish_reason, trace, usage_breakdown
from slhf_server.pipeline import Observer
from slhf_server.plan import OpenAIPlan
from slhf_server.protocol import LeaderAnswer, LogprobEntry
from slhf_server.refine import DeltaSink, RefineJob, RefineOutcome, Refiner, Step


@dataclass(frozen=True)
class RoundDelta:
    index: int
    round: int
    text: str
    logprobs: list[LogprobEntry] | None = None
    """The delta's tokens, when the request asked for logprobs."""


@dataclass(frozen=True)
class ChoiceDone:
    index: int
    outcome: RefineOutcome


Event = RoundDelta | ChoiceDone


async def stream_choice(
    refiner: Refiner, job: RefineJob, sink: DeltaSink, stream_rounds: bool
) -> RefineOutcome:
    """Run one choice, sending its text to ``sink`` so that the streamed text of its final
    round is its final answer.

    The last scheduled round streams as it is generated (every round with ``stream_rounds``,
    which also sends a first answer not generated here -- given, upstream -- in one piece).
    When the loop stops before its last scheduled round, or the final answer was not generated
    here, the final answer is sent in one piece once known; a deadline that cut a streamed round
    leaves its partial text sent, without a resend."""

    def live(i: int) -> DeltaSink | None:
        return sink if stream_rounds or i == job.rounds else None

    steps: list[Step] = []
    async for step in refiner.rounds(job, live):
        steps.append(step)
        if isinstance(step, LeaderAnswer) and stream_rounds and step.source != "leader":
            sink(0, step.text)
    outcome = RefineOutcome.of(steps)
    final_index = outcome.rounds[-1].round if outcome.rounds else 0
    cut_streamed = outcome.stopped_reason == "deadline" and live(final_index + 1) is not None
    was_streamed = (
        stream_rounds
        or cut_streamed
        or (final_index == job.rounds and (final_index > 0 or outcome.leader.source == "leader"))
    )
    if not was_streamed and outcome.final:
        sink(final_index, outcome.final, final_logprobs(outcome))
    return outcome


async def refinement_events(
    refiner: Refiner, jobs: Sequence[RefineJob], stream_rounds: bool
) -> AsyncGenerator[Event, None]:
    """Text deltas and finished choices of all ``jobs``, run concurrently, as they happen.

    The first failure is raised (the other jobs are cancelled); closing the iterator (client
    gone) cancels every job, which aborts its engine request.
    """
    queue: asyncio.Queue[Event | Exception] = asyncio.Queue()

    async def run(index: int, job: RefineJob) -> None:
        def sink(
            round_index: int,
            text: str,
            logprobs: Sequence[TokenLogprob | LogprobEntry] | None = None,
        ) -> None:
            entries = None
            if logprobs is not None:
                entries = [
                    t if isinstance(t, LogprobEntry) else LogprobEntry.of(t) for t in logprobs
                ]
            queue.put_nowait(RoundDelta(index, round_index, text, entries))

        try:
            outcome = await stream_choice(refiner, job, sink, stream_rounds)
            queue.put_nowait(ChoiceDone(index, outcome))
        except Exception as e:
            queue.put_nowait(e)

    tasks = [asyncio.create_task(run(i, job)) for i, job in enumerate(jobs)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            done += isinstance(item, ChoiceDone)
            yield item
    finally:
        for t in tasks:
            t.cancel()


class ChunkWriter:
    """Builds the OpenAI chunks of one streamed response."""

    def __init__(self, plan: OpenAIPlan) -> None:
        self.plan = plan
        self.created = int(time.time())
        self.chat = plan.kind == "chat"
        self.offsets: dict[tuple[int, int], int] = {}
        """(choice, round) -> the length of that round's text sent so far (``text_offset``)."""

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        body: dict[str, Any] = {
            "id": self.plan.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.plan.model,
            "choices": choices,
        }
        if self.plan.include_usage:
            body["usage"] = None
        body.update(extra)
        return sse(body)

    def choice(
        self, index: int, text: str | None, finish: str | None, **extra: Any
    ) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index}
        if self.chat:
            c["delta"] = {} if text is None else {"content": text}
        else:
            c["text"] = text or ""
        c.update(logprobs=None, finish_reason=finish, **extra)
        return c

    def opening(self) -> list[str]:
        if not self.chat:
            return []
        roles = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(len(self.plan.jobs))
        ]
        return [self.chunk(roles)]

    def event(self, ev: Event) -> str:
        if isinstance(ev, RoundDelta):
            choice = self.choice(ev.index, ev.text, None, round=ev.round)
            key = (ev.index, ev.round)
            offset = self.offsets.get(key, 0)
            self.offsets[key] = offset + len(ev.text)
            if ev.logprobs is not None and self.chat:
                choice["logprobs"] = {"content": [e.model_dump() for e in ev.logprobs]}
            elif ev.logprobs is not None:  # the legacy form, offsets within the round's text
                choice["logprobs"] = CompletionLogprobs.of(ev.logprobs, offset).model_dump()
            return self.chunk([choice])
        o = ev.outcome
        extra: dict[str, Any] = {"round": o.rounds[-1].round if o.rounds else 0}
        if self.plan.return_trace:
            extra["refinement"] = trace(o).model_dump()
        return self.chunk([self.choice(ev.index, None, finish_reason(o), **extra)])

    def closing(self, outcomes: Sequence[RefineOutcome]) -> list[str]:
        if not self.plan.include_usage:
            return []
        return [self.chunk([], usage=usage_breakdown(outcomes).model_dump())]


def sse(body: dict[str, Any] | str) -> str:
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return f"data: {data}\n\n"


async def open_stream(
    plan: OpenAIPlan, refiner: Refiner, observe: Observer | None = None
) -> AsyncIterator[str]:
    """Start the jobs and wait for their first event, so that a failure before any text (an
    upstream error, a Leader failure) still gets a plain error response with its status."""
    first, events = await started_events(refiner, plan.jobs, plan.stream_rounds)
    return _sse_stream(plan, first, events, observe)


async def started_events(
    refiner: Refiner, jobs: Sequence[RefineJob], stream_rounds: bool
) -> tuple[Event, AsyncGenerator[Event, None]]:
    """``refinement_events`` started: its first event (a failure before it is raised, the jobs
    closed) and the rest."""
    events = refinement_events(refiner, jobs, stream_rounds)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    return first, events


async def _sse_stream(
    plan: OpenAIPlan,
    first: Event,
    events: AsyncGenerator[Event, None],
    observe: Observer | None,
) -> AsyncIterator[str]:
    writer = ChunkWriter(plan)
    outcomes: dict[int, RefineOutcome] = {}
    try:
        for line in writer.opening():
            yield line
        ev: Event | None = first
        while ev is not None:
            if isinstance(ev, ChoiceDone):
                outcomes[ev.index] = ev.outcome
                if observe is not None:
                    observe(ev.outcome)
            yield writer.event(ev)
            ev = await anext(events, None)
        for line in writer.closing([outcomes[i] for i in sorted(outcomes)]):
            yield line
    except Exception as e:
        yield sse(error_body(domain_error(e)))
    finally:
        await events.aclose()
    yield sse("[DONE]")
