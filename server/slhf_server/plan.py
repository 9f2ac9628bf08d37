"""Planning, the first step of every request (``slhf_server.pipeline`` runs the rest).

A request becomes a ``Plan``: one ``RefineJob`` per choice, every value resolved and checked, so
that whatever a request gets wrong is a 4xx here, before any work is admitted. Both APIs plan
through the same steps:

- ``resolve_model``: ``<name>`` (refined), ``<name>:leader`` (the Leader alone) and, on the OpenAI
  routes, ``<name>@upstream`` (the upstream server's first answer, refined); else a 404;
- ``plan_rounds``: the Follower rounds, the request's or the model id's default, within
  SLHF_MAX_ROUNDS;
- ``role_params``: each role's sampling, the request's values over the manifest's defaults for
  that role, ``max_tokens`` within SLHF_MAX_TOKENS_CAP;
- seeds: choice ``j`` of an ``n``-choice request uses the base seed ``choice_seed(seed, j)``
  (choice 0 = the request's seed), and each round derives its own from that
  (``slhf_server.refine.derive_seed``), so choices differ and a seeded request is reproducible;
- ``Refiner.check_source``: an upstream first answer needs an upstream (the opening prompts are
  checked against the context off the event loop when the plan is admitted,
  ``Refiner.check_opening``).

``plan_refine`` makes the one-choice plan of ``/v1/refine``. ``plan_chat`` and
``plan_completion`` make the OpenAI routes' plans (``OpenAIPlan``): one choice per prompt and
``n`` (index = prompt x n + j, at most SLHF_MAX_N in all), the OpenAI fields applying to every
generation and the ``refinement`` extension setting the rounds, a given answer, the first
answer's source and each role's own sampling over them; what this server does not support is a
400 naming the field (``check_supported``). docs/architecture.md, "One request, route to
engine", draws the whole flow; docs/wire.md is the contract.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from slhf_models.serving.templates import Message, Role, to_messages
from slhf_server.engine import GenerationParams, OutputFormat
from slhf_server.errors import InvalidRequestError, ModelNotFoundError
from slhf_server.openai_protocol import (
    UNSUPPORTED,
    UNSUPPORTED_COMPLETIONS,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIMessage,
    RefinementOptions,
)
from slhf_server.protocol import RefineRequest, ResponseFormat, SamplingOptions
from slhf_server.refine import RefineJob
from slhf_server.service import LEADER_SUFFIX, UPSTREAM_SUFFIX, Service

Kind = Literal["chat", "completion", "response"]

ID_PREFIXES: dict[Kind, str] = {"chat": "chatcmpl-", "completion": "cmpl-", "response": "resp_"}
"""A response's id is its prefix and a random hex (OpenAI's forms)."""

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

SHOWN_COUNT = 10**18
"""Counts from this on are not written out in an error message."""

EXTRA_SAMPLING = ("top_k", *VLLM_EXTRAS)
"""Sampling fields beyond OpenAI's basic ones (vLLM's extras and the penalties), applied to
every generation like ``temperature``; ``refinement.leader``/``follower`` override them per
role."""


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


# -- the shared steps ---------------------------------------------------------------------------
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
    if g.top_logprobs is not None and not g.logprobs:
        raise InvalidRequestError(
            "`top_logprobs` needs `logprobs` to be true", param="top_logprobs"
        )
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=g.temperature if g.temperature is not None else d.temperature,
        top_p=g.top_p if g.top_p is not None else d.top_p,
        top_k=g.top_k if g.top_k is not None else d.top_k,
        seed=g.seed if g.seed is not None else request_seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        output_format=output_format(service, g.response_format),
        logprobs=(g.top_logprobs or 0) if g.logprobs else None,
        logit_bias=tuple((int(k), v) for k, v in sorted((g.logit_bias or {}).items())),
        **extras,
    )


def schema_depth(schema: object, limit: int) -> int:
    """The nesting depth of objects and lists in ``schema``, counting no further than
    ``limit + 1`` (iterative: a hostile schema cannot exhaust the stack)."""
    deepest, stack = 0, [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list) or depth <= 0:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend(
            (child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)
        )
    return deepest


def output_format(service: Service, rf: ResponseFormat | None) -> OutputFormat | None:
    """A ``response_format`` as the engine's constraint; a schema past SLHF_MAX_SCHEMA_BYTES or
    SLHF_MAX_SCHEMA_DEPTH is a 400 (these bound what vLLM turns into a grammar)."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return OutputFormat("json_object")
    assert rf.json_schema is not None  # ResponseFormat checks it
    schema = rf.json_schema.schema_
    if schema is None:
        raise InvalidRequestError(
            "`response_format.json_schema.schema` is required", param="response_format"
        )
    settings = service.settings
    depth = schema_depth(schema, settings.max_schema_depth)
    if depth > settings.max_schema_depth:
        raise InvalidRequestError(
            f"the JSON schema nests deeper than {settings.max_schema_depth} levels "
            "(SLHF_MAX_SCHEMA_DEPTH)",
            param="response_format",
            code="schema_too_large",
        )
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > settings.max_schema_bytes:
        raise InvalidRequestError(
            f"the JSON schema is {size:,} bytes; the limit is {settings.max_schema_bytes:,} "
            "(SLHF_MAX_SCHEMA_BYTES)",
            param="response_format",
            code="schema_too_large",
        )
    return OutputFormat("json_schema", text)


def first_answer_final(
    rounds: int, leader: GenerationParams, follower: GenerationParams, generated: bool
) -> bool:
    """Whether the chain may end on its first answer: it can end there (0 rounds; or a deadline
    or a context too short for round 1), and when the Follower's rounds are constrained to a
    format the first answer must have been generated under the same one. With 0 rounds, a
    format cannot constrain an answer not generated here (given, upstream): a 400."""
    if rounds == 0:
        if leader.output_format is not None and not generated:
            raise InvalidRequestError(
                "a `response_format` cannot constrain a given or upstream first answer; ask for "
                "at least one round (the Follower's rounds are constrained)",
                param="response_format",
            )
        return True
    return follower.output_format is None or (
        generated and leader.output_format == follower.output_format
    )


def choice_seed(base: int | None, choice: int) -> int | None:
    """Base seed of choice ``choice`` of an ``n``-choice request: choice 0 keeps ``base`` (so it
    matches the same request with ``n=1``); the others get their own, reproducible, seeds."""
    if base is None or choice == 0:
        return base
    digest = hashlib.sha256(f"slhf-choice:{base}:{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# -- /v1/refine ---------------------------------------------------------------------------------
def plan_refine(service: Service, body: RefineRequest) -> Plan:
    """``/v1/refine``: a one-choice plan."""
    leader_only, _ = resolve_model(service, body.model, upstream_id=False)
    rounds = plan_rounds(service, body.rounds, leader_only, "rounds")
    prompt = (
        body.prompt if body.prompt is not None else [m.model_dump() for m in body.messages or []]
    )
    leader = role_params(service, "leader", body.leader, body.seed)
    follower = role_params(service, "follower", body.follower, body.seed)
    from_upstream = body.leader is not None and body.leader.source == "upstream"
    job = RefineJob(
        request_id=f"refine-{uuid.uuid4().hex}",
        prompt=prompt,
        rounds=rounds,
        leader=leader,
        follower=follower,
        given_answer=body.response,
        stop_when_unchanged=body.stop_when_unchanged,
        from_upstream=from_upstream,
        deadline_s=service.settings.deadline_s(body.deadline_s),
        first_answer_final=first_answer_final(
            rounds, leader, follower, body.response is None and not from_upstream
        ),
    )
    service.refiner.check_source(job)
    return Plan(request_id=job.request_id, model=body.model or service.name, jobs=[job])


# -- the OpenAI routes --------------------------------------------------------------------------
CHAT_SUPPORTED = (
    "model, messages/prompt, max_tokens, max_completion_tokens, temperature, top_p, n, stop, "
    "seed, stream, stream_options, user, refinement, logit_bias, response_format, logprobs "
    "(chat: true/false with top_logprobs; completions: an integer 0..5), and the sampling "
    f"fields {', '.join(EXTRA_SAMPLING)}"
)


def reject_unsupported(
    req: object, table: dict[str, tuple[object, ...]], supported: str, prefix: str = ""
) -> None:
    """Reject (400, naming the field) any field of ``table`` that ``req`` sets to a value other
    than its neutral ones."""
    for name, neutral in table.items():
        value = getattr(req, name, None)
        if not any(value == v and type(value) is type(v) for v in neutral) and value is not None:
            raise InvalidRequestError(
                f"`{prefix}{name}` is not supported by this server (got {value!r:.200}); remove "
                f"it. Supported: {supported}.",
                param=prefix + name,
                code="unsupported_field",
            )


def check_supported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Reject (400, naming the field) any unsupported field set to a value that would matter."""
    reject_unsupported(req, UNSUPPORTED, CHAT_SUPPORTED)
    if isinstance(req, CompletionRequest):
        reject_unsupported(req, UNSUPPORTED_COMPLETIONS, CHAT_SUPPORTED)
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
    own_values = (
        {
            name: getattr(own, name)
            for name in own.model_fields_set - {"source"}
            if getattr(own, name) is not None
        }
        if own
        else {}
    )
    merged = base.model_copy(update=own_values)
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
    """An OpenAI request's plan: ``n`` choices per prompt, at most SLHF_MAX_N in all."""
    check_supported(req)
    if isinstance(req, ChatCompletionRequest):
        logprobs, top_logprobs = req.logprobs, req.top_logprobs
    else:  # the legacy integer: the sampled token and this many alternatives
        logprobs, top_logprobs = (None, None) if req.logprobs is None else (True, req.logprobs)
    base = SamplingOptions(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        logit_bias=req.logit_bias,
        response_format=req.response_format,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        **{name: getattr(req, name) for name in EXTRA_SAMPLING},
    )
    return plan_openai(
        service,
        kind=kind,
        model=req.model,
        opts=req.refinement or RefinementOptions(),
        base=base,
        seed=req.seed,
        n=req.n,
        prompts=prompts,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def plan_openai(
    service: Service,
    *,
    kind: Kind,
    model: str | None,
    opts: RefinementOptions,
    base: SamplingOptions,
    seed: int | None,
    n: int,
    prompts: Sequence[str | list[Message]],
    include_usage: bool = False,
) -> OpenAIPlan:
    """The plan of an OpenAI-style request once its fields are read: ``base`` sampling for every
    generation, ``opts`` (the ``refinement`` extension) over it, ``n`` choices per prompt."""
    leader_only, from_upstream = resolve_model(service, model, upstream_id=True)
    if opts.leader is not None and opts.leader.source == "upstream":
        from_upstream = True
    if from_upstream and opts.response is not None:
        raise InvalidRequestError(
            "give either `refinement.response` or an upstream first answer, not both",
            param="refinement.response",
        )
    rounds = plan_rounds(service, opts.rounds, leader_only, "refinement.rounds")
    choices = len(prompts) * n
    if choices > service.settings.max_n:
        raise InvalidRequestError(
            f"this request asks for {_count(choices)} choices ({len(prompts)} prompt(s) x "
            f"n={_count(n)}); the limit is {service.settings.max_n} (SLHF_MAX_N)",
            param="n",
            code="too_many_choices",
        )
    deadline_s = service.settings.deadline_s(opts.deadline_s)
    request_id = f"{ID_PREFIXES[kind]}{uuid.uuid4().hex}"
    # the request's response_format constrains the rounds that can end the chain: the
    # Follower's, and the Leader's only with 0 rounds (docs/wire.md, "Structured outputs")
    leader_base = base if rounds == 0 else base.model_copy(update={"response_format": None})
    generated = opts.response is None and not from_upstream
    jobs = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            leader = _role_params(service, "leader", leader_base, opts.leader, seed, j)
            follower = _role_params(service, "follower", base, opts.follower, seed, j)
            job = RefineJob(
                request_id=f"{request_id}-{p * n + j}",
                prompt=prompt,
                rounds=rounds,
                leader=leader,
                follower=follower,
                given_answer=opts.response,
                stop_when_unchanged=opts.stop_when_unchanged,
                from_upstream=from_upstream,
                deadline_s=deadline_s,
                first_answer_final=first_answer_final(rounds, leader, follower, generated),
            )
            service.refiner.check_source(job)
            jobs.append(job)
    return OpenAIPlan(
        request_id=request_id,
        model=model or service.name,
        jobs=jobs,
        kind=kind,
        return_trace=opts.return_trace,
        stream_rounds=opts.stream_rounds,
        include_usage=include_usage,
    )


def plan_chat(service: Service, req: ChatCompletionRequest) -> OpenAIPlan:
    """``/v1/chat/completions``: one prompt, ``n`` choices."""
    max_tokens = req.max_completion_tokens or req.max_tokens
    return plan_request(service, req, "chat", [chat_prompt(req.messages)], max_tokens)


def plan_completion(service: Service, req: CompletionRequest) -> OpenAIPlan:
    """``/v1/completions``: ``n`` choices for each prompt."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or any(not p.strip() for p in prompts):
        raise InvalidRequestError("`prompt` must be a non-empty string", param="prompt")
    return plan_request(service, req, "completion", prompts, req.max_tokens)
