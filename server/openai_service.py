"""OpenAI chat/completions requests as refinement jobs, and their results as OpenAI responses.

A request becomes one ``RefineJob`` per choice (``n`` per prompt), run concurrently so they
batch in the engine. The answer of a choice is its final round. Choice ``j`` uses the base seed
``choice_seed(seed, j)`` (choice 0 = the request's seed), and each round derives its own seed
from that, so choices differ and a seeded request is reproducible.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from slhf.models.serving.templates import Message, Role, to_messages
from slhf.server.errors import InvalidRequestError
from slhf.server.openai_protocol import (
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIMessage,
    RefinementOptions,
    RefinementTrace,
    UsageBreakdown,
)
from slhf.server.protocol import SamplingParams, Usage
from slhf.server.refine import RefineJob, RefineOutcome, Refiner, choice_seed
from slhf.server.service import Service

Kind = Literal["chat", "completion"]

EXTRA_SAMPLING = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
)
"""Sampling fields beyond OpenAI's basic ones (vLLM's extras and the penalties), applied to
every generation like ``temperature``; ``refinement.leader``/``follower`` override them per
role."""


@dataclass(frozen=True)
class OpenAIPlan:
    """A validated OpenAI request: one job per choice (index = choice index)."""

    kind: Kind
    request_id: str
    model: str
    jobs: list[RefineJob]
    return_trace: bool
    stream_rounds: bool
    include_usage: bool

    @property
    def rounds(self) -> int:
        return self.jobs[0].rounds if self.jobs else 0


def check_supported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Reject (400, naming the field) any unsupported field set to a value that would matter."""
    for name, neutral in UNSUPPORTED.items():
        value = getattr(req, name, None)
        if not any(value == v and type(value) is type(v) for v in neutral) and value is not None:
            raise InvalidRequestError(
                f"`{name}` is not supported by this server (got {value!r}); remove it. "
                "Supported: model, messages/prompt, max_tokens, max_completion_tokens, "
                "temperature, top_p, n, stop, seed, stream, stream_options, user, refinement, "
                f"and the sampling fields {', '.join(EXTRA_SAMPLING)}.",
                param=name,
                code="unsupported_field",
            )
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError(
            "`stream_options` is only allowed when `stream` is true", param="stream_options"
        )


def chat_prompt(messages: Sequence[OpenAIMessage]) -> list[Message]:
    """OpenAI messages as template messages: text parts joined, ``developer`` as ``system``."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        if m.role in ("tool", "function") or (m.model_extra or {}).get("tool_calls"):
            raise InvalidRequestError(
                f"messages[{i}]: tool messages and tool calls are not supported",
                param=f"messages[{i}]",
            )
        if m.content is None:
            raise InvalidRequestError(
                f"messages[{i}].content must be text; got null", param=f"messages[{i}].content"
            )
        if isinstance(m.content, str):
            text = m.content
        else:
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}] has type {part.type!r}; only 'text' "
                        "content parts are supported",
                        param=f"messages[{i}].content[{j}]",
                    )
            text = "".join(part.text or "" for part in m.content)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": text})
    return to_messages(out)


def _role_params(
    service: Service,
    role: Role,
    base: SamplingParams,
    own: SamplingParams | None,
    seed: int | None,
    choice: int,
) -> Any:
    merged = base.model_copy(
        update=own.model_dump(exclude_none=True, exclude={"source"}) if own else {}
    )
    role_seed = merged.seed if merged.seed is not None else seed
    merged = merged.model_copy(update={"seed": choice_seed(role_seed, choice)})
    return service.generation_params(role, merged, None)


def plan_request(
    service: Service,
    req: ChatCompletionRequest | CompletionRequest,
    kind: Kind,
    prompts: Sequence[str | list[Message]],
    max_tokens: int | None,
) -> OpenAIPlan:
    check_supported(req)
    leader_only, from_upstream = service.resolve_openai_model(req.model)
    opts = req.refinement or RefinementOptions()
    if opts.leader is not None and opts.leader.source == "upstream":
        from_upstream = True
    if from_upstream and opts.response is not None:
        raise InvalidRequestError(
            "give either `refinement.response` or an upstream first answer, not both",
            param="refinement.response",
        )
    default = 0 if leader_only else service.default_rounds
    rounds = service.check_rounds(
        opts.rounds if opts.rounds is not None else default, "refinement.rounds"
    )
    base = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        **{name: getattr(req, name) for name in EXTRA_SAMPLING},
    )
    choices = len(prompts) * req.n
    if choices > service.settings.max_n:
        raise InvalidRequestError(
            f"this request asks for {choices} choices ({len(prompts)} prompt(s) x n={req.n}); "
            f"the limit is {service.settings.max_n} (SLHF_MAX_N)",
            param="n",
            code="too_many_choices",
        )
    deadline_s = service.settings.deadline_s(opts.deadline_s)
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    jobs = []
    for p, prompt in enumerate(prompts):
        for j in range(req.n):
            job = RefineJob(
                request_id=f"{request_id}-{p * req.n + j}",
                prompt=prompt,
                rounds=rounds,
                leader=_role_params(service, "leader", base, opts.leader, req.seed, j),
                follower=_role_params(service, "follower", base, opts.follower, req.seed, j),
                given_answer=opts.response,
                stop_when_unchanged=opts.stop_when_unchanged,
                from_upstream=from_upstream,
                deadline_s=deadline_s,
            )
            if j == 0:  # every prompt checked against the context before any work starts
                service.refiner.opening_prompts(job)
            jobs.append(job)
    return OpenAIPlan(
        kind=kind,
        request_id=request_id,
        model=req.model or service.name,
        jobs=jobs,
        return_trace=opts.return_trace,
        stream_rounds=opts.stream_rounds,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def plan_chat(service: Service, req: ChatCompletionRequest) -> OpenAIPlan:
    max_tokens = req.max_completion_tokens or req.max_tokens
    return plan_request(service, req, "chat", [chat_prompt(req.messages)], max_tokens)


def plan_completion(service: Service, req: CompletionRequest) -> OpenAIPlan:
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or any(not p.strip() for p in prompts):
        raise InvalidRequestError("`prompt` must be a non-empty string", param="prompt")
    return plan_request(service, req, "completion", prompts, req.max_tokens)


async def run_jobs(refiner: Refiner, jobs: Sequence[RefineJob]) -> list[RefineOutcome]:
    """All jobs concurrently (they batch in the engine); the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(refiner.refine(job)) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


# -- results ------------------------------------------------------------------------------------
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
