"""Finished choices as OpenAI responses: the answer of a choice is its final round.

``usage`` counts every generation of the request (all rounds of all choices) and adds ``by_role``
and ``by_round`` (round 0 = the first answer); a choice's ``finish_reason`` is its final
round's, "deadline" when the deadline cut the refinement; with ``refinement.return_trace`` each
choice carries its rounds. The streamed form of the same answer is ``slhf_server.openai_stream``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from slhf_server.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    RefinementTrace,
    UsageBreakdown,
)
from slhf_server.plan import OpenAIPlan
from slhf_server.protocol import LogprobEntry, Usage
from slhf_server.refine import RefineOutcome


def _add(total: dict[str, int], u: Usage) -> None:
    for k, v in u.counts().items():
        total[k] = total.get(k, 0) + v


def usage_breakdown(outcomes: Sequence[RefineOutcome]) -> UsageBreakdown:
    zero = Usage().counts()
    by_role = {"leader": dict(zero), "follower": dict(zero)}
    by_round: list[dict[str, int]] = []
    total = Usage()
    for o in outcomes:
        total = total + o.usage
        _add(by_role["leader"], o.leader.usage)
        steps = [(0, o.leader.usage), *((r.round, r.usage) for r in o.rounds)]
        for index, usage in steps:
            while len(by_round) <= index:
                by_round.append({"round": len(by_round), **zero})
            _add(by_round[index], usage)
        for r in o.rounds:
            _add(by_role["follower"], r.usage)
    return UsageBreakdown(**total.model_dump(), by_role=by_role, by_round=by_round)


def finish_reason(outcome: RefineOutcome) -> str:
    """The final round's finish reason; "deadline" when the deadline cut the refinement."""
    if outcome.stopped_reason == "deadline":
        return "deadline"
    if outcome.rounds:
        return outcome.rounds[-1].finish_reason
    return outcome.leader.finish_reason or "stop"


def trace(outcome: RefineOutcome) -> RefinementTrace:
    return RefinementTrace(
        leader=outcome.leader, rounds=outcome.rounds, stopped_reason=outcome.stopped_reason
    )


def chat_response(plan: OpenAIPlan, outcomes: Sequence[RefineOutcome]) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=o.final),
            logprobs=_logprobs(o),
            **_choice(plan, o),
        )
        for i, o in enumerate(outcomes)
    ]
    return ChatCompletionResponse(choices=choices, **_response(plan, outcomes))


def completion_response(plan: OpenAIPlan, outcomes: Sequence[RefineOutcome]) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=i, text=o.final, logprobs=_completion_logprobs(o), **_choice(plan, o)
        )
        for i, o in enumerate(outcomes)
    ]
    return CompletionResponse(choices=choices, **_response(plan, outcomes))


def final_logprobs(outcome: RefineOutcome) -> list[LogprobEntry] | None:
    """The log-probabilities of the answer's tokens: the final round's (None when not asked)."""
    return outcome.rounds[-1].logprobs if outcome.rounds else outcome.leader.logprobs


def _logprobs(outcome: RefineOutcome) -> ChoiceLogprobs | None:
    entries = final_logprobs(outcome)
    return None if entries is None else ChoiceLogprobs(content=entries)


def _completion_logprobs(outcome: RefineOutcome) -> CompletionLogprobs | None:
    entries = final_logprobs(outcome)
    return None if entries is None else CompletionLogprobs.of(entries)


def _choice(plan: OpenAIPlan, outcome: RefineOutcome) -> dict[str, Any]:
    """What a choice says besides its text."""
    return {
        "finish_reason": finish_reason(outcome),
        "refinement": trace(outcome) if plan.return_trace else None,
    }


def _response(plan: OpenAIPlan, outcomes: Sequence[RefineOutcome]) -> dict[str, Any]:
    """What a response says besides its choices."""
    return {
        "id": plan.request_id,
        "created": int(time.time()),
        "model": plan.model,
        "usage": usage_breakdown(outcomes),
    }
