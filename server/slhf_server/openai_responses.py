"""``POST /v1/responses`` (OpenAI's Responses API): its plan, its answer and its stream.

A Responses request is planned like a chat completion with one choice
(``slhf_server.plan.plan_openai``): ``instructions`` become a system message before ``input``,
``max_output_tokens`` is every generation's ``max_tokens``, the ``refinement`` extension is the
other OpenAI routes'. Its answer is one assistant message whose text is the final round
(``response_object``); ``status`` is "completed", or "incomplete" when the final round ran out of
``max_output_tokens`` (or the deadline cut the refinement). The stream
(``open_response_stream``) sends the Responses API's events around the final round's text
deltas, which follow the streaming policy of ``slhf_server.openai_stream``. docs/wire.md,
"Responses API", is the contract.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from slhf_models.serving.templates import Message, TemplateError, to_messages
from slhf_server.errors import InvalidRequestError, domain_error, error_body
from slhf_server.openai_protocol import RefinementOptions
from slhf_server.openai_response import final_logprobs, finish_reason, trace, usage_breakdown
from slhf_server.openai_stream import ChoiceDone, Event, RoundDelta, started_events
from slhf_server.pipeline import Observer
from slhf_server.plan import EXTRA_SAMPLING, OpenAIPlan, plan_openai, reject_unsupported
from slhf_server.protocol import SamplingOptions
from slhf_server.refine import RefineOutcome, Refiner
from slhf_server.responses_protocol import (
    RESPONSES_SUPPORTED,
    UNSUPPORTED_RESPONSES,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ResponseObject,
    ResponsesRequest,
    ResponsesUsage,
)
from slhf_server.service import Service

MESSAGE_ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text")
"""Content parts taken as text: ``input_text``, and ``output_text`` of an assistant message
given back as history."""


@dataclass(frozen=True)
class ResponsePlan(OpenAIPlan):
    """A planned Responses request, with the request's values its answer repeats."""

    echo: dict[str, Any]
    """``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``, ``metadata``,
    ``user``: the response object states them as the API does."""


# -- planning -----------------------------------------------------------------------------------
def input_messages(req: ResponsesRequest) -> list[Message]:
    """``instructions`` (as a system message) and ``input`` as template messages; anything but
    text messages is a 400 naming the item."""
    out: list[Message] = []
    if req.instructions is not None:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        out.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            out.append(_item_message(i, item.type, item.role, item.content))
    try:
        return to_messages(out)
    except TemplateError as e:
        raise InvalidRequestError(str(e).replace("messages", "input"), param="input") from None


def _item_message(i: int, kind: str | None, role: str | None, content: Any) -> Message:
    where = f"input[{i}]"
    if kind not in (None, "message"):
        raise InvalidRequestError(
            f"{where} has type {kind!r:.100}; only message items (text) are supported",
            param=f"{where}.type",
        )
    if role not in MESSAGE_ROLES:
        raise InvalidRequestError(
            f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}; got {role!r:.100}",
            param=f"{where}.role",
        )
    if content is None:
        raise InvalidRequestError(
            f"{where}.content must be text; got null", param=f"{where}.content"
        )
    if isinstance(content, str):
        text = content
    else:
        for j, part in enumerate(content):
            if part.type not in TEXT_PARTS or part.text is None:
                raise InvalidRequestError(
                    f"{where}.content[{j}] has type {part.type!r:.100}; only "
                    f"{' and '.join(TEXT_PARTS)} parts are supported",
                    param=f"{where}.content[{j}]",
                )
        text = "".join(part.text or "" for part in content)
    return {"role": "system" if role == "developer" else role, "content": text}


def plan_responses(service: Service, req: ResponsesRequest) -> ResponsePlan:
    """``/v1/responses``: a one-choice plan; what the server cannot honour is a 400 naming it."""
    reject_unsupported(req, UNSUPPORTED_RESPONSES, RESPONSES_SUPPORTED)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError(
            "`stream_options` is only allowed when `stream` is true", param="stream_options"
        )
    logprobs = "message.output_text.logprobs" in (req.include or [])
    if req.top_logprobs and not logprobs:
        raise InvalidRequestError(
            '`top_logprobs` needs `include: ["message.output_text.logprobs"]`',
            param="top_logprobs",
        )
    try:
        response_format = (
            req.text.format.as_response_format() if req.text and req.text.format else None
        )
    except ValueError as e:
        raise InvalidRequestError(str(e), param="text.format") from None
    base = SamplingOptions(
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        response_format=response_format,
        logprobs=logprobs or None,
        top_logprobs=req.top_logprobs if logprobs else None,
        logit_bias=req.logit_bias,
        **{name: getattr(req, name) for name in EXTRA_SAMPLING},
    )
    try:
        plan = plan_openai(
            service,
            kind="response",
            model=req.model,
            opts=req.refinement or RefinementOptions(),
            base=base,
            seed=req.seed,
            n=1,
            prompts=[input_messages(req)],
        )
    except InvalidRequestError as e:
        if e.param == "max_tokens":  # this API's names for them
            e.param = "max_output_tokens"
            e.message = e.message.replace("max_tokens is", "max_output_tokens is", 1)
        elif e.param == "response_format":
            e.param = "text.format"
        raise
    echo = {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "metadata": req.metadata,
        "user": req.user,
        "top_logprobs": req.top_logprobs,
        "text": req.text.model_dump(by_alias=True, exclude_none=True)
        if req.text is not None
        else {"format": {"type": "text"}},
    }
    return ResponsePlan(**{f.name: getattr(plan, f.name) for f in fields(plan)}, echo=echo)


# -- the answer ---------------------------------------------------------------------------------
def status_of(outcome: RefineOutcome) -> tuple[str, IncompleteDetails | None]:
    """ "completed", or "incomplete" with its reason: the final round ran out of
    ``max_output_tokens``, or the deadline cut the refinement."""
    reason = finish_reason(outcome)
    if reason == "stop":
        return "completed", None
    return "incomplete", IncompleteDetails(
        reason="max_output_tokens" if reason == "length" else reason
    )


def responses_usage(outcome: RefineOutcome) -> ResponsesUsage:
    u = usage_breakdown([outcome])
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    return ResponsesUsage(
        input_tokens=u.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=u.completion_tokens,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=u.total_tokens,
        by_role=u.by_role,
        by_round=u.by_round,
    )


def message(message_id: str, outcome: RefineOutcome) -> OutputMessage:
    status, _ = status_of(outcome)
    return OutputMessage(
        id=message_id,
        status="completed" if status == "completed" else "incomplete",
        content=[OutputText(text=outcome.final, logprobs=final_logprobs(outcome) or [])],
    )


def response_object(
    plan: ResponsePlan,
    outcome: RefineOutcome | None,
    *,
    message_id: str | None = None,
    created_at: int | None = None,
) -> ResponseObject:
    """The response: in progress (``outcome`` None: no output yet) or finished."""
    common: dict[str, Any] = {
        "id": plan.request_id,
        "created_at": created_at if created_at is not None else int(time.time()),
        "model": plan.model,
        **plan.echo,
    }
    if outcome is None:
        return ResponseObject(status="in_progress", output=[], **common)
    status, incomplete = status_of(outcome)
    return ResponseObject(
        status=status,
        incomplete_details=incomplete,
        output=[message(message_id or f"msg_{uuid.uuid4().hex}", outcome)],
        usage=responses_usage(outcome),
        refinement=trace(outcome) if plan.return_trace else None,
        **common,
    )


# -- the stream ---------------------------------------------------------------------------------
class EventWriter:
    """Numbers and writes the Server-Sent Events of one streamed response."""

    def __init__(self, plan: ResponsePlan) -> None:
        self.plan = plan
        self.sequence = 0
        self.created_at = int(time.time())
        self.item_id = f"msg_{uuid.uuid4().hex}"

    def event(self, kind: str, **body: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **body}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    def response(self, outcome: RefineOutcome | None) -> dict[str, Any]:
        obj = response_object(
            self.plan, outcome, message_id=self.item_id, created_at=self.created_at
        )
        return obj.model_dump()

    def opening(self) -> list[str]:
        item = {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [
            self.event("response.created", response=self.response(None)),
            self.event("response.in_progress", response=self.response(None)),
            self.event("response.output_item.added", output_index=0, item=item),
            self.event(
                "response.content_part.added", **where, part=OutputText(text="").model_dump()
            ),
        ]

    def delta(self, ev: RoundDelta) -> str:
        return self.event(
            "response.output_text.delta",
            item_id=self.item_id,
            output_index=0,
            content_index=0,
            delta=ev.text,
            logprobs=[e.model_dump() for e in ev.logprobs or []],
            round=ev.round,
        )

    def closing(self, outcome: RefineOutcome) -> list[str]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        text = outcome.final
        done = self.response(outcome)
        last = "response.completed" if done["status"] == "completed" else "response.incomplete"
        return [
            self.event(
                "response.output_text.done",
                **where,
                text=text,
                logprobs=[e.model_dump() for e in final_logprobs(outcome) or []],
            ),
            self.event(
                "response.content_part.done",
                **where,
                part=message(self.item_id, outcome).content[0].model_dump(),
            ),
            self.event(
                "response.output_item.done",
                output_index=0,
                item=message(self.item_id, outcome).model_dump(),
            ),
            self.event(last, response=done),
        ]

    def failure(self, exc: Exception) -> list[str]:
        envelope = error_body(domain_error(exc))
        err = envelope["error"]
        failed = self.response(None) | {
            "status": "failed",
            "error": {"code": err["code"], "message": err["message"]},
        }
        return [
            # OpenAI's error event, and the envelope under "error" (the SDK raises it)
            self.event(
                "error", code=err["code"], message=err["message"], param=err["param"], **envelope
            ),
            self.event("response.failed", response=failed),
        ]


async def open_response_stream(
    plan: ResponsePlan, refiner: Refiner, observe: Observer | None = None
) -> AsyncIterator[str]:
    """Start the plan's one job and wait for its first event, so that a failure before any text
    still gets a plain error response with its status (``openai_stream.open_stream``)."""
    first, events = await started_events(refiner, plan.jobs, plan.stream_rounds)
    return _event_stream(plan, first, events, observe)


async def _event_stream(
    plan: ResponsePlan,
    first: Event,
    events: AsyncGenerator[Event, None],
    observe: Observer | None,
) -> AsyncIterator[str]:
    writer = EventWriter(plan)
    outcome: RefineOutcome | None = None
    try:
        for line in writer.opening():
            yield line
        ev: Event | None = first
        while ev is not None:
            if isinstance(ev, ChoiceDone):
                outcome = ev.outcome
                if observe is not None:
                    observe(outcome)
            else:
                yield writer.delta(ev)
            ev = await anext(events, None)
        assert outcome is not None  # refinement_events ends with the choice's ChoiceDone
        for line in writer.closing(outcome):
            yield line
    except Exception as e:
        for line in writer.failure(e):
            yield line
    finally:
        await events.aclose()
