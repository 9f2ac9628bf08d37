"""Wire models of the OpenAI-compatible routes: ``/v1/chat/completions`` and ``/v1/completions``.

Standard fields keep their OpenAI meaning. Fields this server does not support are declared so a
request that uses them gets a 400 naming the field (``unsupported_field``); unknown fields are a
400 too (never silently ignored). Our extension is the ``refinement`` object, which the OpenAI
SDK sends through ``extra_body``. Types are strict and texts must be encodable, as on
``/v1/refine`` (``server.protocol``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.generation import MAX_TEMPERATURE
from server.protocol import (
    LeaderAnswer,
    LeaderParams,
    RoundResult,
    SamplingParams,
    Seed,
    StoppedReason,
    Text,
    encodable,
)

MAX_N = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RefinementOptions(_Request):
    """The ``refinement`` extension field (send it with the SDK's ``extra_body``)."""

    rounds: int | None = None
    """Follower rounds; default: the model id's (``<name>``: manifest default, ``:leader``: 0)."""
    response: Text | None = None
    """An answer to refine instead of a Leader answer (``leader.source`` = "given")."""
    stop_when_unchanged: bool = True
    return_trace: bool = False
    """Add every round's text and usage to each choice (``choices[i].refinement``)."""
    stream_rounds: bool = False
    """When streaming: stream every round, each chunk marked with its ``round``."""
    leader: LeaderParams | None = None
    """Leader-only sampling over the request's fields; ``source`` = "upstream" as ``@upstream``."""
    follower: SamplingParams | None = None
    """Follower-only sampling over the request's fields."""
    deadline_s: float | None = Field(None, gt=0)
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
    continuous_usage_stats: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Text
    text: Text | None = None


class OpenAIMessage(BaseModel):
    # extra fields (e.g. "name") are harmless; tool calls are checked in server.openai_service
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return encodable(v) if isinstance(v, str) else v


class _OpenAIRequest(_Request):
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    refinement: RefinementOptions | None = None
    # harmless: accepted and ignored
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        return SamplingParams._stop(v)

    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: Text | None = None
    # not supported: a request setting them to anything but their neutral value gets a 400
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[OpenAIMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    # not supported
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]
    # not supported
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        for p in [v] if isinstance(v, str) else v:
            encodable(p)
        return v


# -- responses ----------------------------------------------------------------------------------
class UsageBreakdown(BaseModel):
    """OpenAI ``usage`` (every generation of the request: all rounds of all choices) plus
    ``by_role`` and ``by_round`` (round 0 = the first answer), summed over the choices."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    by_role: dict[str, dict[str, int]] = Field(default_factory=dict)
    by_round: list[dict[str, int]] = Field(default_factory=list)


class RefinementTrace(BaseModel):
    leader: LeaderAnswer
    rounds: list[RoundResult]
    stopped_reason: StoppedReason


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None
    refinement: RefinementTrace | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBreakdown


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None
    refinement: RefinementTrace | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBreakdown
