"""OpenAI chat/completions requests as plans (``slhf_server.pipeline``'s first step).

A request becomes one ``RefineJob`` per choice (``n`` per prompt, index = prompt x n + j), run
concurrently so they batch in the engine; the answer of a choice is its final round
(``slhf_server.openai_response``). The OpenAI fields apply to every generation; the ``refinement``
extension sets the rounds, a given answer, the first answer's source and each role's own
sampling over them. Choice ``j`` uses the base seed ``choice_seed(seed, j)`` (choice 0 = the
request's seed), and each round derives its own seed from that, so choices differ and a seeded
request is reproducible.

What this server does not support is a 400 naming the field (``check_supported``); the model id,
the rounds, the roles' sampling and the context are checked by the pipeline's shared steps.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from slhf_models.serving.templates import Message, Role, to_messages
from slhf_server.engine import GenerationParams
from slhf_server.errors import InvalidRequestError
from slhf_server.openai_protocol import (
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIMessage,
    RefinementOptions,
)
from slhf_server.pipeline import VLLM_EXTRAS, Plan, plan_rounds, resolve_model, role_params
from slhf_server.protocol import SamplingOptions
from slhf_server.refine import RefineJob, choice_seed
from slhf_server.service import Service

Kind = Literal["chat", "completion"]

SHOWN_COUNT = 10**18
"""Counts from this on are not written out in an error message."""

EXTRA_SAMPLING = ("top_k", *VLLM_EXTRAS)
"""Sampling fields beyond OpenAI's basic ones (vLLM's extras and the penalties), applied to
every generation like ``temperature``; ``refinement.leader``/``follower`` override them per
role."""


@dataclass(frozen=True)
class OpenAIPlan(Plan):
    """A validated OpenAI request, and how to answer it."""

    kind: Kind
    return_trace: bool
    """Each choice carries its rounds (``refinement.return_trace``)."""
    stream_rounds: bool
    """A stream sends every round, not only the final one (``refinement.stream_rounds``)."""
    include_usage: bool
    """A stream ends with a usage chunk (``stream_options.include_usage``)."""


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
    base: SamplingOptions,
    own: SamplingOptions | None,
    seed: int | None,
    choice: int,
) -> GenerationParams:
    """The request's sampling for every generation, the role's own over it, with choice
    ``choice``'s seed."""
    merged = base.model_copy(
        update=own.model_dump(exclude_none=True, exclude={"source"}) if own else {}
    )
    role_seed = merged.seed if merged.seed is not None else seed
    merged = merged.model_copy(update={"seed": choice_seed(role_seed, choice)})
    return role_params(service, role, merged, None)


def _count(x: int) -> str:
    """A count for an error message; an absurd one (a hostile ``n`` of thousands of digits, which
    Python will not even turn into text) is not spelled out."""
    return str(x) if x < SHOWN_COUNT else f"more than {SHOWN_COUNT:,}"


def plan_request(
    service: Service,
    req: ChatCompletionRequest | CompletionRequest,
    kind: Kind,
    prompts: Sequence[str | list[Message]],
    max_tokens: int | None,
) -> OpenAIPlan:
    check_supported(req)
    leader_only, from_upstream = resolve_model(service, req.model, upstream_id=True)
    opts = req.refinement or RefinementOptions()
    if opts.leader is not None and opts.leader.source == "upstream":
        from_upstream = True
    if from_upstream and opts.response is not None:
        raise InvalidRequestError(
            "give either `refinement.response` or an upstream first answer, not both",
            param="refinement.response",
        )
    rounds = plan_rounds(service, opts.rounds, leader_only, "refinement.rounds")
    base = SamplingOptions(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        **{name: getattr(req, name) for name in EXTRA_SAMPLING},
    )
    choices = len(prompts) * req.n
    if choices > service.settings.max_n:
        raise InvalidRequestError(
            f"this request asks for {_count(choices)} choices ({len(prompts)} prompt(s) x "
            f"n={_count(req.n)}); the limit is {service.settings.max_n} (SLHF_MAX_N)",
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
        request_id=request_id,
        model=req.model or service.name,
        jobs=jobs,
        kind=kind,
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
