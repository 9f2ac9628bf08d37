"""OpenAI-compatible routes: ``/v1/chat/completions`` and ``/v1/completions`` (thin).

Each parses its body, plans it (``slhf_server.plan``), runs or streams the plan on the
request pipeline (``slhf_server.pipeline``) and answers (``slhf_server.openai_response``, or
the SSE stream of ``slhf_server.openai_stream``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from slhf_server import pipeline
from slhf_server.json_answer import json_answer
from slhf_server.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from slhf_server.openai_response import chat_response, completion_response
from slhf_server.openai_stream import open_stream
from slhf_server.openapi import ERROR_RESPONSES, sse_response
from slhf_server.plan import plan_chat, plan_completion
from slhf_server.service import ServiceDep

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={**sse_response(ChatCompletionResponse, "chat completion"), **ERROR_RESPONSES},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> Response:
    """OpenAI chat completions; the answer is the final round of the refinement."""
    plan = plan_chat(service, body)
    if body.stream:
        return await pipeline.stream(service, request, plan, open_stream)
    outcomes = await pipeline.run(service, request, plan)
    return await json_answer(lambda: chat_response(plan, outcomes))


@router.post(
    "/v1/completions",
    response_model=None,
    responses={**sse_response(CompletionResponse, "completion"), **ERROR_RESPONSES},
)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Response:
    """OpenAI completions: each prompt is a question, answered and refined."""
    plan = plan_completion(service, body)
    if body.stream:
        return await pipeline.stream(service, request, plan, open_stream)
    outcomes = await pipeline.run(service, request, plan)
    return await json_answer(lambda: completion_response(plan, outcomes))
