"""OpenAI-compatible routes: ``/v1/chat/completions`` and ``/v1/completions`` (thin)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from slhf.server.lifecycle import guarded_stream, run_guarded
from slhf.server.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from slhf.server.openai_service import (
    OpenAIPlan,
    finish_reason,
    plan_chat,
    plan_completion,
    run_jobs,
    trace,
    usage_breakdown,
)
from slhf.server.openai_stream import open_stream
from slhf.server.openapi import ERROR_RESPONSES, sse_response
from slhf.server.refine import RefineOutcome
from slhf.server.service import Service, ServiceDep

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _stream(plan: OpenAIPlan, request: Request, service: Service) -> StreamingResponse:
    """Admit, start the stream; the ticket is released when the stream ends."""
    ticket = await service.admit(len(plan.jobs), plan.rounds)
    try:
        lines = await run_guarded(
            request, ticket, open_stream(plan, service.refiner, service.metrics.observe_outcome)
        )
    except BaseException:
        ticket.release()
        raise
    body = guarded_stream(request, ticket, lines)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def _run(plan: OpenAIPlan, request: Request, service: Service) -> list[RefineOutcome]:
    """Admit and run every choice of a non-streaming request."""
    ticket = await service.admit(len(plan.jobs), plan.rounds)
    try:
        outcomes = await run_guarded(request, ticket, run_jobs(service.refiner, plan.jobs))
    finally:
        ticket.release()
    for o in outcomes:
        service.metrics.observe_outcome(o)
    return outcomes


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={**sse_response(ChatCompletionResponse, "chat completion"), **ERROR_RESPONSES},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> ChatCompletionResponse | StreamingResponse:
    """OpenAI chat completions; the answer is the final round of the refinement."""
    plan = plan_chat(service, body)
    if body.stream:
        return await _stream(plan, request, service)
    outcomes = await _run(plan, request, service)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=o.final),
            finish_reason=finish_reason(o),
            refinement=trace(o) if plan.return_trace else None,
        )
        for i, o in enumerate(outcomes)
    ]
    return ChatCompletionResponse(
        id=plan.request_id,
        created=int(time.time()),
        model=plan.model,
        choices=choices,
        usage=usage_breakdown(outcomes),
    )


@router.post(
    "/v1/completions",
    response_model=None,
    responses={**sse_response(CompletionResponse, "completion"), **ERROR_RESPONSES},
)
async def completions(
    body: CompletionRequest, request: Request, service: ServiceDep
) -> CompletionResponse | StreamingResponse:
    """OpenAI completions: each prompt is a question, answered and refined."""
    plan = plan_completion(service, body)
    if body.stream:
        return await _stream(plan, request, service)
    outcomes = await _run(plan, request, service)
    choices = [
        CompletionChoice(
            index=i,
            text=o.final,
            finish_reason=finish_reason(o),
            refinement=trace(o) if plan.return_trace else None,
        )
        for i, o in enumerate(outcomes)
    ]
    return CompletionResponse(
        id=plan.request_id,
        created=int(time.time()),
        model=plan.model,
        choices=choices,
        usage=usage_breakdown(outcomes),
    )
