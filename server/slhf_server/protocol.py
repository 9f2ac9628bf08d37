"""Wire models of the SLHF routes (the wire contract: docs/wire.md).

Names are fixed; add fields, never rename.

Requests are validated strictly, as the OpenAI API and vLLM's server do: a JSON type is never
coerced (``"rounds": true``, ``"max_tokens": "10"``, ``"stream": "yes"`` are 400s; an integer
is accepted where a number is expected), ``NaN`` and ``Infinity`` are refused, every text must
be encodable Unicode (no lone surrogates), and numeric bounds are the engine's own
(``slhf_server.engine``). docs/reliability.md lists what this guarantees.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from slhf_server.engine import (
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    SEED_RANGE,
    FinishReason,
    Generation,
    TokenLogprob,
)

StoppedReason = Literal["max_rounds", "unchanged", "deadline", "context_length"]
AnswerSource = Literal["leader", "given", "upstream"]


def encodable(text: str) -> str:
    """Refuse text that UTF-8 cannot encode: a lone UTF-16 surrogate (valid JSON, ``"\\ud800"``)
    that tokenizers and the engine's serializer reject."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text must be valid Unicode; character {e.start} is a lone UTF-16 surrogate "
            f"(U+{ord(text[e.start]):04X})"
        ) from None
    return text


def _top_k(v: int) -> int:
    if v == 0:
        raise ValueError("top_k must be -1 (disabled) or >= 1; got 0")
    return v


MAX_STOP_STRINGS = 16


def _stop(v: str | list[str]) -> str | list[str]:
    stops = [v] if isinstance(v, str) else v
    for s in stops:
        encodable(s)
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed; got {len(stops)}")
    return v


# Each request field's type and bounds, declared once and used by every request model (this
# module's and ``slhf_server.openai_protocol``'s); numeric bounds are the engine's own
# (``slhf_server.engine``). A model declares ``<Alias> | None = None`` with its own docstring.
Text = Annotated[str, AfterValidator(encodable)]
"""A string field of a request: encodable Unicode."""
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]
MaxTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1, le=MAX_TOP_K), AfterValidator(_top_k)]
"""-1 (no limit) or 1..MAX_TOP_K."""
Stop = Annotated[str | list[str], AfterValidator(_stop)]
"""Up to 16 non-empty, encodable strings."""
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
"""``presence_penalty`` and ``frequency_penalty``."""
MinTokens = Annotated[int, Field(ge=0)]
DeadlineS = Annotated[float, Field(gt=0)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
"""Alternatives returned per token, 0..20."""
MAX_LOGIT_BIAS_TOKENS = 1024


def _logit_bias(v: dict[str, float]) -> dict[str, float]:
    if len(v) > MAX_LOGIT_BIAS_TOKENS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens may be biased; got {len(v)}")
    for key, bias in v.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise ValueError(f"logit_bias keys are token ids (decimal integers); got {key[:40]!r}")
        if not -100.0 <= bias <= 100.0:
            raise ValueError(f"logit_bias values are between -100 and 100; got {bias}")
    return v


LogitBias = Annotated[dict[str, float], AfterValidator(_logit_bias)]
"""Token id (as a string) -> bias added to its logit, -100 to 100; at most 1024 tokens."""


class _Request(BaseModel):
    # Unknown fields are an error, so a typo ("round") is reported instead of ignored; strict:
    # no type coercion; no NaN/Infinity (Python's JSON parser accepts them).
    # The docstring under each field is its description in /openapi.json.
    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


class VllmSamplingFields(_Request):
    """vLLM's sampling fields beyond OpenAI's core ones (and OpenAI's penalties), declared once:
    ``/v1/refine``'s per-role sampling and the OpenAI routes' requests both take them."""

    top_k: TopK | None = None
    """Sample among the ``top_k`` most likely tokens; -1 = no limit."""
    min_p: MinP | None = None
    """vLLM: drop tokens less likely than ``min_p`` x the most likely token's probability."""
    repetition_penalty: RepetitionPenalty | None = None
    """vLLM: > 1 discourages tokens already in the prompt or the text, < 1 encourages them."""
    presence_penalty: Penalty | None = None
    """Penalty on tokens that already appeared in the text, -2 to 2."""
    frequency_penalty: Penalty | None = None
    """Penalty growing with how often a token already appeared in the text, -2 to 2."""
    min_tokens: MinTokens | None = None
    """vLLM: generate at least this many tokens before a stop string or EOS may end it."""
    ignore_eos: bool | None = None
    """vLLM: keep generating past the end-of-sequence token (until ``max_tokens``)."""


class JsonSchemaSpec(_Request):
    """``response_format.json_schema``: the schema the answer must match."""

    name: Text
    """The schema's name (as OpenAI requires; not used)."""
    description: Text | None = None
    """Not used."""
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """The JSON schema; bounded by SLHF_MAX_SCHEMA_BYTES and SLHF_MAX_SCHEMA_DEPTH."""
    strict: bool | None = None
    """Accepted: the answer is always constrained to the schema."""


class ResponseFormat(_Request):
    """Structured outputs: ``text`` (none), ``json_object`` (any JSON object) or
    ``json_schema`` (JSON matching ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    """The kind of output."""
    json_schema: JsonSchemaSpec | None = None
    """With ``type`` "json_schema": the schema."""

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is required with type 'json_schema', and only then")
        return self


class SamplingOptions(VllmSamplingFields):
    """Per-role sampling; unset fields take the manifest's defaults for that role (the fields
    the manifest has no default for take vLLM's neutral value). Bounds are vLLM's."""

    max_tokens: MaxTokens | None = None
    """Most tokens to generate (per round); capped by SLHF_MAX_TOKENS_CAP."""
    temperature: Temperature | None = None
    """Sampling temperature, 0 (greedy) to 2."""
    top_p: TopP | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches ``top_p``."""
    seed: Seed | None = None
    """Seed of this role's generations (each round derives its own from it)."""
    stop: Stop | None = None
    """Up to 16 strings that end a generation (not included in the text)."""
    response_format: ResponseFormat | None = None
    """Constrain this role's generations to JSON, or to a JSON schema (docs/wire.md,
    "Structured outputs")."""
    logprobs: bool | None = None
    """Return the log-probability of each token of this role's answers."""
    top_logprobs: TopLogprobs | None = None
    """With ``logprobs``: the most likely alternatives per token, 0..20."""
    logit_bias: LogitBias | None = None
    """Token id (a string) -> bias (-100..100) added to its logit; at most 1024 tokens."""


class LeaderSamplingOptions(SamplingOptions):
    """The Leader's sampling, and where the first answer comes from."""

    source: Literal["leader", "upstream"] = "leader"
    """"upstream": ask the upstream server (SLHF_UPSTREAM_*) for the first answer."""


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    """Who wrote the message; the last one must be the user's."""
    content: Text
    """The message's text."""


class RefineRequest(_Request):
    model: Text | None = None
    """``<name>`` (refined) or ``<name>:leader`` (no refinement); default: the served model."""
    prompt: Text | None = None
    """The question as plain text (give this or ``messages``)."""
    messages: list[ChatMessage] | None = None
    """The question as a chat (give this or ``prompt``)."""
    response: Text | None = None
    """An answer to refine instead of a Leader answer (``leader.source`` = "given")."""
    rounds: int | None = None
    """Follower rounds; default: the model's default rounds. Range 0..SLHF_MAX_ROUNDS."""
    leader: LeaderSamplingOptions | None = None
    """The Leader's sampling (round 0), and where the first answer comes from."""
    follower: SamplingOptions | None = None
    """The Follower's sampling (rounds 1..)."""
    stop_when_unchanged: bool = True
    """Stop early when a round returns the previous answer unchanged."""
    seed: Seed | None = None
    """Base seed for every round (a role's own ``seed`` takes precedence for that role)."""
    deadline_s: DeadlineS | None = None
    """Seconds the refinement may take (capped by SLHF_MAX_DEADLINE_S). When it passes, the
    best completed round is returned with ``stopped_reason`` = "deadline"; a 504 if not even
    the first answer was complete."""

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> RefineRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` or `messages` must be given")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("`prompt` must not be empty")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("`messages` must contain at least one message")
            if self.messages[-1].role != "user":
                raise ValueError(
                    f"the last message must have role 'user'; got '{self.messages[-1].role}'"
                )
            if not any(m.content.strip() for m in self.messages if m.role == "user"):
                raise ValueError("`messages` must contain a non-empty user message")
        if self.response is not None and not self.response.strip():
            raise ValueError("`response` must not be empty when given")
        if self.response is not None and self.leader and self.leader.source == "upstream":
            raise ValueError("give either `response` or `leader.source` = 'upstream', not both")
        return self


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens served from the engine's prefix cache instead of being prefilled."""


class CompletionTokensDetails(BaseModel):
    accepted_prediction_tokens: int = 0
    """Draft tokens (``SLHF_SPECULATIVE``) the model accepted: generated without a step each."""
    rejected_prediction_tokens: int = 0
    """Draft tokens the model rejected (computed, then discarded)."""


class UnknownDetailsLeftOut(BaseModel):
    """Serializes without ``prompt_tokens_details`` / ``completion_tokens_details`` when they
    are None (not reported), so usage stays as it was where nothing is known."""

    @model_serializer(mode="wrap")
    def _leave_out_unknown_details(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        for key in ("prompt_tokens_details", "completion_tokens_details"):
            if isinstance(out, dict) and out.get(key, 0) is None:
                del out[key]
        return out


class Usage(UnknownDetailsLeftOut):
    """Token counts (OpenAI's names); the details are left out when the engine does not report
    them (a given or upstream answer, an engine without the counter, drafting off)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(cls, g: Generation) -> Usage:
        """The usage of one generation."""
        drafts = None
        if g.drafts is not None:
            drafts = CompletionTokensDetails(
                accepted_prediction_tokens=g.drafts.accepted,
                rejected_prediction_tokens=g.drafts.rejected,
            )
        return cls(
            prompt_tokens=g.prompt_tokens,
            completion_tokens=g.completion_tokens,
            total_tokens=g.prompt_tokens + g.completion_tokens,
            prompt_tokens_details=None
            if g.cached_tokens is None
            else PromptTokensDetails(cached_tokens=g.cached_tokens),
            completion_tokens_details=drafts,
        )

    def counts(self) -> dict[str, int]:
        """The counts as one flat mapping; a detail only when reported."""
        out = {k: getattr(self, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        if self.prompt_tokens_details is not None:
            out.update(self.prompt_tokens_details.model_dump())
        if self.completion_tokens_details is not None:
            out.update(self.completion_tokens_details.model_dump())
        return out

    def __add__(self, other: Usage) -> Usage:
        def plus(a: BaseModel | None, b: BaseModel | None) -> dict[str, int] | None:
            if a is None and b is None:
                return None
            da, db = (x.model_dump() if x is not None else {} for x in (a, b))
            return {k: da.get(k, 0) + db.get(k, 0) for k in {*da, *db}}

        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            prompt_tokens_details=plus(self.prompt_tokens_details, other.prompt_tokens_details),
            completion_tokens_details=plus(
                self.completion_tokens_details, other.completion_tokens_details
            ),
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class LogprobEntry(BaseModel):
    """One token of an answer, as OpenAI's ``logprobs.content`` entries."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]

    @classmethod
    def of(cls, t: TokenLogprob) -> LogprobEntry:
        return cls(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.token.encode("utf-8", "replace")),
            top_logprobs=[
                TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode("utf-8", "replace")))
                for tok, lp in t.top
            ],
        )


def logprob_entries(g: Generation) -> list[LogprobEntry] | None:
    return None if g.logprobs is None else [LogprobEntry.of(t) for t in g.logprobs]


class _Step(BaseModel):
    """A round of the chain; ``logprobs`` and ``output_format`` appear only when used."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    logprobs: list[LogprobEntry] | None = None
    """This round's tokens with their log-probabilities (when ``logprobs`` was asked)."""
    output_format: Literal["json_object", "json_schema"] | None = None
    """The structured-output constraint this round was generated under, if any."""

    @model_serializer(mode="wrap")
    def _leave_out_unused(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        for key in ("logprobs", "output_format"):
            if isinstance(out, dict) and key in out and out[key] is None:
                del out[key]
        return out


class LeaderAnswer(_Step):
    text: str
    source: AnswerSource
    finish_reason: FinishReason | None
    usage: Usage
    latency_ms: float


class RoundResult(_Step):
    round: int
    text: str
    finish_reason: FinishReason
    usage: Usage
    latency_ms: float


class RefineResponse(BaseModel):
    id: str
    object: Literal["refinement"] = "refinement"
    created: int
    model: str
    leader: LeaderAnswer
    rounds: list[RoundResult]
    final: str
    stopped_reason: StoppedReason
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slhf"
    root: str
    parent: str | None = None
    max_model_len: int
    slhf: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    """The OpenAI error envelope: every non-2xx answer of the server has this body."""

    error: ErrorDetail
