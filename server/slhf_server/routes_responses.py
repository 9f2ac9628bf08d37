"""``POST /v1/responses``, OpenAI's Responses API (thin): parse, plan, run or stream, answer
(``slhf_server.openai_responses``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from slhf_server import pipeline
from slhf_server.json_answer import json_answer
from slhf_server.openai_responses import open_response_stream, plan_responses, response_object
from slhf_server.openapi import ERROR_RESPONSES, sse_response
from slhf_server.responses_protocol import ResponseObject, ResponsesRequest
from slhf_server.service import ServiceDep

router = APIRouter()

OK = sse_response(ResponseObject, "response")
OK[200]["description"] = (
    "The response; with `stream: true`, Server-Sent Events of the Responses API "
    "(`response.created`, ..., `response.output_text.delta`, ..., `response.completed`)."
)


@router.post(
    "/v1/responses",
    response_model=None,
    responses={**OK, **ERROR_RESPONSES},
)
async def responses(body: ResponsesRequest, request: Request, service: ServiceDep) -> Response:
    """OpenAI Responses API; the answer is the final round of the refinement."""
    plan = plan_responses(service, body)
    if body.stream:
        return await pipeline.stream(service, request, plan, open_response_stream)
    [outcome] = await pipeline.run(service, request, plan)
    return await json_answer(lambda: response_object(plan, outcome))
