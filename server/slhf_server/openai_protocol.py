"""Wire models of the OpenAI-compatible routes: ``/v1/chat/completions`` and ``/v1/completions``.

Standard fields keep their OpenAI meaning, and vLLM's common extra sampling fields (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``) are accepted as vLLM's server
accepts them. Fields this server does not support are declared (``UNSUPPORTED``, marked
``x-slhf-unsupported`` in /openapi.json) so a request that sets them gets a 400 naming the field
(``unsupported_field``); unknown fields are a 400 too (never silently ignored). Our extension is
the ``refinement`` object, which the OpenAI SDK sends through ``extra_body``. Types are strict
and texts must be encodable, as on ``/v1/refine`` (``slhf_server.protocol``). The docstring under a
field is its description in /openapi.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slhf_server.protocol import (
    CompletionTokensDetails,
    DeadlineS,
    LeaderAnswer,
    LeaderSamplingOptions,
    LogitBias,
    LogprobEntry,
    MaxTokens,
    PromptTokensDetails,
    ResponseFormat,
    RoundResult,
    SamplingOptions,
    Seed,
    Stop,
    StoppedReason,
    Temperature,
    Text,
    TopLogprobs,
    TopP,
    UnknownDetailsLeftOut,
    VllmSamplingFields,
    _Request,
    encodable,
)

UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
"""Fields this server does not support, and the values that mean "not used" (accepted)."""
UNSUPPORTED_COMPLETIONS: dict[str, tuple[Any, ...]] = {"top_logprobs": (None, 0)}
"""Fields ``/v1/completions`` does not support besides those: chat's ``top_logprobs`` (the
legacy API counts the alternatives in its integer ``logprobs``)."""
MAX_COMPLETION_LOGPROBS = 5
"""The legacy completions API's most alternatives per token (OpenAI's bound)."""
CompletionLogprobsCount = Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)]


def unsupported() -> Any:
    """A declared but unsupported field: any value but its neutral ones is a 400."""
    return Field(
        None,
        description="Not supported by this server: a value other than null or its neutral "
        "value (e.g. false, 0, []) is rejected with a 400, code `unsupported_field`.",
        json_schema_extra={"x-slhf-unsupported": True},
    )


class RefinementOptions(_Request):
    """The ``refinement`` extension field (send it with the SDK's ``extra_body``)."""

    rounds: int | None = None
    """Follower rounds; default: the model id's (``<name>``: manifest default, ``:leader``: 0)."""
    response: Text | None = None
    """An answer to refine instead of a Leader answer (``leader.source`` = "given")."""
    stop_when_unchanged: bool = True
    """Stop early when a round returns the previous answer unchanged."""
    return_trace: bool = False
    """Add every round's text and usage to each choice (``choices[i].refinement``)."""
    stream_rounds: bool = False
    """When streaming: stream every round, each chunk marked with its ``round``."""
    leader: LeaderSamplingOptions | None = None
    """Leader-only sampling over the request's fields; ``source`` = "upstream" as ``@upstream``."""
    follower: SamplingOptions | None = None
    """Follower-only sampling over the request's fields."""
    deadline_s: DeadlineS | None = None
    """Seconds the refinement may take (capped by SLHF_MAX_DEADLINE_S); when it passes, the best
    completed round is the answer (``finish_reason`` = "deadline")."""

    @field_validator("response")
    @classmethod
    def _response(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("`refinement.response` must not be empty when given")
        return v


class StreamOptions(_Request):
    include_usage: bool = False
    """Send a last chunk with ``choices: []`` and the request's ``usage``."""
    continuous_usage_stats: bool = False
    """Accepted for vLLM compatibility; usage is only sent in the last chunk."""


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Text
    text: Text | None = None


class OpenAIMessage(BaseModel):
    # extra fields (e.g. "name") are harmless; tool calls are checked in slhf_server.plan
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return encodable(v) if isinstance(v, str) else v


class _OpenAIRequest(VllmSamplingFields):  # the vLLM fields apply to every generation
    model: Text | None = None
    """``<name>`` (refined), ``<name>:leader`` (no refinement) or ``<name>@upstream``."""
    max_tokens: MaxTokens | None = None
    """Most tokens per generation (the Leader's and each round's)."""
    temperature: Temperature | None = None
    """Sampling temperature, 0 (greedy) to 2, for every generation."""
    top_p: TopP | None = None
    """Nucleus sampling, for every generation."""
    n: int = Field(1, ge=1)
    """Choices per prompt, each refined independently; ``n`` x prompts is at most SLHF_MAX_N."""
    stop: Stop | None = None
    """Up to 16 strings that end a generation."""
    seed: Seed | None = None
    """Base seed of choice 0; other choices and every round derive theirs from it."""
    stream: bool = False
    """Stream Server-Sent Events in OpenAI chunk format."""
    stream_options: StreamOptions | None = None
    """Only with ``stream``."""
    refinement: RefinementOptions | None = None
    """The SLHF extension: rounds, a given answer, per-role sampling, the trace."""
    # harmless: accepted and ignored
    user: Text | None = None
    """Accepted and ignored."""
    metadata: dict[str, Any] | None = None
    """Accepted and ignored."""
    store: bool | None = None
    """Accepted and ignored."""
    service_tier: Text | None = None
    """Accepted and ignored."""
    logit_bias: LogitBias | None = None
    """Token id (a string) -> bias (-100..100) added to its logit, in every generation."""


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[OpenAIMessage]
    """The conversation; the last message must be the user's. Text content only."""
    max_completion_tokens: MaxTokens | None = None
    """As ``max_tokens`` (wins over it)."""
    response_format: ResponseFormat | None = None
    """Structured outputs: ``json_object`` or ``json_schema``; constrains every round that can
    end the refinement (docs/wire.md, "Structured outputs")."""
    logprobs: bool | None = None
    """Return the answer's tokens with their log-probabilities (``choices[i].logprobs``)."""
    top_logprobs: TopLogprobs | None = None
    """With ``logprobs``: the most likely alternatives per token, 0..20."""
    tools: Any = unsupported()
    tool_choice: Any = unsupported()
    functions: Any = unsupported()
    function_call: Any = unsupported()
    parallel_tool_calls: Any = unsupported()
    audio: Any = unsupported()
    modalities: Any = unsupported()
    prediction: Any = unsupported()
    reasoning_effort: Any = unsupported()
    web_search_options: Any = unsupported()


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]
    """The question(s), each rendered with the Leader template (not continued raw)."""
    response_format: ResponseFormat | None = None
    """Structured outputs: ``json_object`` or ``json_schema``; constrains every round that can
    end the refinement (docs/wire.md, "Structured outputs")."""
    logprobs: CompletionLogprobsCount | None = None
    """Legacy form: return the answer's tokens with their log-probabilities and this many most
    likely alternatives per token, 0..5 (``choices[i].logprobs``: ``tokens``,
    ``token_logprobs``, ``top_logprobs``, ``text_offset``)."""
    echo: Any = unsupported()
    suffix: Any = unsupported()
    best_of: Any = unsupported()
    top_logprobs: Any = unsupported()

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        for p in [v] if isinstance(v, str) else v:
            encodable(p)
        return v


# -- responses ----------------------------------------------------------------------------------
class UsageBreakdown(UnknownDetailsLeftOut):
    """OpenAI ``usage`` (every generation of the request: all rounds of all choices) plus
    ``by_role`` and ``by_round`` (round 0 = the first answer), summed over the choices."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    """``cached_tokens``: prompt tokens served from the engine's prefix cache (all rounds)."""
    completion_tokens_details: CompletionTokensDetails | None = None
    """``accepted_prediction_tokens`` / ``rejected_prediction_tokens`` of ``SLHF_SPECULATIVE``."""
    by_role: dict[str, dict[str, int]] = Field(default_factory=dict)
    by_round: list[dict[str, int]] = Field(default_factory=list)


class RefinementTrace(BaseModel):
    """Every round of one choice (``refinement.return_trace``)."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    leader: LeaderAnswer
    """Round 0: the first answer (the Leader's, a given one or the upstream's)."""
    rounds: list[RoundResult]
    """Follower rounds 1.., each with its text, finish reason, usage and latency."""
    stopped_reason: StoppedReason
    """Why refinement stopped: "max_rounds", "unchanged", "deadline" or "context_length"."""


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChoiceLogprobs(BaseModel):
    content: list[LogprobEntry]
    """The answer's (the final round's) tokens."""


class ChatChoice(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    """With ``logprobs``: the answer's tokens, i.e. the final round's (the trace's last round)."""
    refinement: RefinementTrace | None = None
    """Every round of this choice, with ``refinement.return_trace``."""


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBreakdown


class CompletionLogprobs(BaseModel):
    """The legacy completions API's log-probabilities of the answer's tokens (the final
    round's): one entry per token in each list."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    tokens: list[str]
    """Each token's text."""
    token_logprobs: list[float]
    """Each token's log-probability."""
    top_logprobs: list[dict[str, float]]
    """Per token: the most likely alternatives (token text -> log-probability), the sampled
    token always among them (up to ``logprobs`` + 1 entries)."""
    text_offset: list[int]
    """Per token: where its text starts in the choice's text (in a streamed chunk: in the text
    of that chunk's round)."""

    @classmethod
    def of(cls, entries: Sequence[LogprobEntry], offset: int = 0) -> CompletionLogprobs:
        """The legacy form of ``entries``, the first token's text starting at ``offset``."""
        top: list[dict[str, float]] = []
        starts: list[int] = []
        for e in entries:
            alternatives: dict[str, float] = {}
            for alt in e.top_logprobs:  # ranked; a text two tokens share keeps the likelier
                alternatives.setdefault(alt.token, alt.logprob)
            alternatives.setdefault(e.token, e.logprob)
            top.append(alternatives)
            starts.append(offset)
            offset += len(e.token)
        return cls(
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=top,
            text_offset=starts,
        )


class CompletionChoice(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    """With ``logprobs``: the answer's tokens, i.e. the final round's (the trace's last round)."""
    refinement: RefinementTrace | None = None
    """Every round of this choice, with ``refinement.return_trace``."""


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBreakdown
