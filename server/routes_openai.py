"""OpenAI-compatible routes: ``/v1/chat/completions`` and ``/v1/completions`` (thin)."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from server.openai_service import (
    OpenAIPlan,
    finish_reason,
    plan_chat,
    plan_completion,
    run_jobs,
    trace,
    usage_breakdown,
)
from server.openai_stream import open_stream
from server.service import Service, ServiceDep

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _stream(plan: OpenAIPlan, service: Service) -> StreamingResponse:
    lines = await open_stream(plan, service.refiner)
    return StreamingResponse(lines, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, service: ServiceDep
) -> ChatCompletionResponse | StreamingResponse:
    plan = plan_chat(service, body)
    if body.stream:
        return await _stream(plan, service)
    outcomes = await run_jobs(service.refiner, plan.jobs)
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


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, service: ServiceDep
) -> CompletionResponse | StreamingResponse:
    plan = plan_completion(service, body)
    if body.stream:
        return await _stream(plan, service)
    outcomes = await run_jobs(service.refiner, plan.jobs)
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
