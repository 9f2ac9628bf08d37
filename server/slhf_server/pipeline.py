"""The one path every request takes: plan -> admit -> run or stream -> observe.

Both APIs use it; a route only parses its body, plans it, calls the steps below and shapes the
answer. This module admits, runs and observes; it plans nothing.

1. **plan** -- ``slhf_server.plan`` turns the request into a ``Plan``: one ``RefineJob`` per
   choice, every value resolved, so that everything a request gets wrong is a 4xx before any
   work is admitted.
2. **admit** -- every opening prompt is checked against the context, off the event loop
   (``Refiner.check_opening``); then the plan weighs choices x (rounds + 1) generations against
   ``SLHF_MAX_INFLIGHT_GENERATIONS`` (``slhf_server.admission``): a 429 at capacity, a 503 when
   the engine is dead or the server drains.
3. **run** -- every choice runs the refinement loop (``slhf_server.refine``) concurrently, so the
   choices batch in the engine (``slhf_server.vllm_engine``); the first failure cancels the others.
   **stream** -- the same, with the text of the streamed rounds sent as it is generated (the
   protocol's writer: ``slhf_server.openai_stream``); the first event is awaited before the
   response starts, so a failure before any text is a plain error response with its status.
   Both are guarded (``slhf_server.lifecycle``): a client that disconnects, or a drain that runs
   out of time, cancels the work, which aborts its engine requests.
4. **observe** -- each finished choice's rounds, stop reason, latencies and tokens go to the
   metrics (``slhf_server.metrics``).

The route then answers: ``RefineResponse`` for ``/v1/refine``, ``slhf_server.openai_response``
for the OpenAI routes (or the stream). docs/architecture.md draws the whole flow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from slhf_server import tracing
from slhf_server.admission import Ticket
from slhf_server.lifecycle import check_health, guarded_stream, run_guarded
from slhf_server.plan import Plan
from slhf_server.refine import RefineJob, RefineOutcome, Refiner
from slhf_server.service import Service

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- 2. admit -----------------------------------------------------------------------------------
async def admit(service: Service, plan: Plan) -> Ticket:
    """Admit the plan's weight, or raise 400 (a prompt too long, checked off the event loop),
    503 (engine dead, draining) / 429 (at capacity)."""
    tracing.annotate_request(plan.model, plan.rounds, len(plan.jobs), plan.request_id)
    await service.refiner.check_opening(plan.jobs)
    if not service.admission.draining:
        await check_health(service.engine)
    return service.admission.acquire(len(plan.jobs) * (plan.rounds + 1))


# -- 3. run or stream, 4. observe ---------------------------------------------------------------
async def run(service: Service, request: Request, plan: Plan) -> list[RefineOutcome]:
    """Admit the plan, run its choices to their end and observe them: the outcomes, by choice."""
    ticket = await admit(service, plan)
    try:
        outcomes = await run_guarded(request, ticket, run_jobs(service.refiner, plan.jobs))
    finally:
        ticket.release()
    observe = tracing.observing(service.metrics.observe_outcome)
    for outcome in outcomes:
        observe(outcome)
    return outcomes


async def run_jobs(refiner: Refiner, jobs: Sequence[RefineJob]) -> list[RefineOutcome]:
    """All jobs concurrently (they batch in the engine); the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(refiner.refine(job)) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


Observer = Callable[[RefineOutcome], None]
"""Told of each choice as it finishes (``ServiceMetrics.observe_outcome``)."""
P = TypeVar("P", bound=Plan)
StreamOpener = Callable[[P, Refiner, Observer], Awaitable[AsyncIterator[str]]]
"""A protocol's stream writer (``slhf_server.openai_stream.open_stream``): starts the plan's
choices, returns once the first event is known (raising a failure before it), and yields the
response's lines, observing each choice as it finishes."""


async def stream(
    service: Service, request: Request, plan: P, open_stream: StreamOpener[P]
) -> StreamingResponse:
    """Admit the plan and start its stream; the ticket is released when the stream ends."""
    ticket = await admit(service, plan)
    try:
        lines = await run_guarded(
            request,
            ticket,
            open_stream(plan, service.refiner, tracing.observing(service.metrics.observe_outcome)),
        )
    except BaseException:
        ticket.release()
        raise
    body = guarded_stream(request, ticket, lines)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
