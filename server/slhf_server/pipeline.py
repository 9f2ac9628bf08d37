"""The one path every request takes: plan -> admit -> run or stream -> observe.

Both APIs use it; a route only parses its body, calls the steps below and shapes the answer.

1. **plan** -- the request becomes a ``Plan``: one ``RefineJob`` per choice, every value resolved
   (the model id, the rounds, each role's sampling over the manifest's defaults, the deadline)
   and every opening prompt checked against the context. ``plan_refine`` makes the one-choice
   plan of ``/v1/refine``; the OpenAI routes plan with ``slhf_server.openai_plan`` (one choice
   per prompt and ``n``), through the same steps: ``resolve_model``, ``plan_rounds``,
   ``role_params`` and ``Refiner.opening_prompts``. Everything a request gets wrong is a 4xx
   here, before any work is admitted.
2. **admit** -- the plan weighs choices x (rounds + 1) generations against
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
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from slhf_models.serving.templates import Role
from slhf_server.admission import Ticket
from slhf_server.engine import GenerationParams
from slhf_server.errors import InvalidRequestError, ModelNotFoundError
from slhf_server.lifecycle import check_health, guarded_stream, run_guarded
from slhf_server.protocol import RefineRequest, SamplingOptions
from slhf_server.refine import RefineJob, RefineOutcome, Refiner
from slhf_server.service import LEADER_SUFFIX, UPSTREAM_SUFFIX, Service

VLLM_EXTRAS = (
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
)
"""vLLM's extra sampling fields (and the penalties) the manifest has no default for: unset =
vLLM's neutral value."""

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Plan:
    """A validated request: one refinement job per choice (index = choice index)."""

    request_id: str
    model: str
    """The model id the answer names (the request's, else the served model's name)."""
    jobs: list[RefineJob]

    @property
    def rounds(self) -> int:
        return self.jobs[0].rounds if self.jobs else 0


# -- 1. plan ------------------------------------------------------------------------------------
def resolve_model(
    service: Service, requested: str | None, *, upstream_id: bool
) -> tuple[bool, bool]:
    """Check a request's ``model``: (Leader only?, first answer from upstream?).

    ``<name>`` (or none) is refined; ``<name>:leader`` is the Leader alone; with ``upstream_id``
    (the OpenAI routes), ``<name>@upstream`` asks the upstream server for the first answer and
    refines it. Anything else is a 404 listing the served ids."""
    if requested is None or requested == service.name:
        return False, False
    if requested == service.name + LEADER_SUFFIX:
        return True, False
    if upstream_id and requested == service.name + UPSTREAM_SUFFIX:
        return False, True
    raise ModelNotFoundError(requested, service.model_ids)


def plan_rounds(service: Service, requested: int | None, leader_only: bool, param: str) -> int:
    """The Follower rounds: the request's, else the model id's default (0 for ``:leader``);
    a 400 outside 0..SLHF_MAX_ROUNDS."""
    rounds = requested if requested is not None else (0 if leader_only else service.default_rounds)
    limit = service.settings.max_rounds
    if not 0 <= rounds <= limit:
        raise InvalidRequestError(
            f"{param} must be between 0 and {limit} (SLHF_MAX_ROUNDS); got {rounds}", param=param
        )
    return rounds


def role_params(
    service: Service, role: Role, given: SamplingOptions | None, request_seed: int | None
) -> GenerationParams:
    """A role's request values over the manifest's defaults for that role; ``max_tokens`` is
    capped by SLHF_MAX_TOKENS_CAP (a 400 above it)."""
    d = service.weights.manifest.role(role).sampling
    g = given or SamplingOptions()
    cap = service.settings.max_tokens_cap
    if g.max_tokens is not None and g.max_tokens > cap:
        raise InvalidRequestError(
            f"max_tokens is {g.max_tokens:,} for the {role}; the limit is {cap:,} "
            "(SLHF_MAX_TOKENS_CAP)",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    stop = g.stop if g.stop is not None else d.stop
    max_tokens = g.max_tokens if g.max_tokens is not None else min(d.max_tokens, cap)
    if g.min_tokens is not None and g.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens is {g.min_tokens:,} for the {role}, more than its max_tokens "
            f"({max_tokens:,})",
            param="min_tokens",
        )
    extras = g.model_dump(include=set(VLLM_EXTRAS), exclude_none=True)
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=g.temperature if g.temperature is not None else d.temperature,
        top_p=g.top_p if g.top_p is not None else d.top_p,
        top_k=g.top_k if g.top_k is not None else d.top_k,
        seed=g.seed if g.seed is not None else request_seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        **extras,
    )


def plan_refine(service: Service, body: RefineRequest) -> Plan:
    """``/v1/refine``: a one-choice plan."""
    leader_only, _ = resolve_model(service, body.model, upstream_id=False)
    rounds = plan_rounds(service, body.rounds, leader_only, "rounds")
    prompt = (
        body.prompt if body.prompt is not None else [m.model_dump() for m in body.messages or []]
    )
    job = RefineJob(
        request_id=f"refine-{uuid.uuid4().hex}",
        prompt=prompt,
        rounds=rounds,
        leader=role_params(service, "leader", body.leader, body.seed),
        follower=role_params(service, "follower", body.follower, body.seed),
        given_answer=body.response,
        stop_when_unchanged=body.stop_when_unchanged,
        from_upstream=body.leader is not None and body.leader.source == "upstream",
        deadline_s=service.settings.deadline_s(body.deadline_s),
    )
    service.refiner.opening_prompts(job)  # a prompt too long is a 400 before admission
    return Plan(request_id=job.request_id, model=body.model or service.name, jobs=[job])


# -- 2. admit -----------------------------------------------------------------------------------
async def admit(service: Service, plan: Plan) -> Ticket:
    """Admit the plan's weight, or raise 503 (engine dead, draining) / 429 (at capacity)."""
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
    for outcome in outcomes:
        service.metrics.observe_outcome(outcome)
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
            request, ticket, open_stream(plan, service.refiner, service.metrics.observe_outcome)
        )
    except BaseException:
        ticket.release()
        raise
    body = guarded_stream(request, ticket, lines)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
