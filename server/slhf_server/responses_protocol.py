"""Wire models of ``POST /v1/responses`` (OpenAI's Responses API), docs/wire.md "Responses API".

The request takes the Responses API's fields this server can honour -- ``input`` (a string, or a
list of message items whose content is a string or ``input_text`` / ``output_text`` parts),
``instructions``, ``max_output_tokens``, ``temperature``, ``top_p`` -- vLLM's extra sampling
fields, ``seed`` and ``stop`` as vLLM's own ``/v1/responses`` takes them, and the ``refinement``
extension of the other OpenAI routes. The Responses API's fields it cannot honour (stored
responses, tools, background runs, reasoning, ...) are declared (``UNSUPPORTED_RESPONSES``,
marked ``x-slhf-unsupported`` in /openapi.json) so that a request setting one gets a 400 naming
it; unknown fields are a 400 too. The docstring under a field is its description in
/openapi.json.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slhf_server.openai_protocol import RefinementOptions, RefinementTrace, unsupported
from slhf_server.protocol import (
    JsonSchemaSpec,
    LogitBias,
    LogprobEntry,
    MaxTokens,
    ResponseFormat,
    Seed,
    Stop,
    Temperature,
    Text,
    TopLogprobs,
    TopP,
    VllmSamplingFields,
    _Request,
    encodable,
)

UNSUPPORTED_RESPONSES: dict[str, tuple[Any, ...]] = {
    "previous_response_id": (None,),
    "conversation": (None,),
    "prompt": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, False, True),
    "max_tool_calls": (None,),
    "background": (None, False),
    "background_options": (None,),
    "store": (None, False),
    "include": (None, [], ["message.output_text.logprobs"]),
    "reasoning": (None,),
    "truncation": (None, "disabled"),
    "context_management": (None, []),
    "prompt_cache_options": (None,),
    "prompt_cache_retention": (None,),
    "moderation": (None,),
    "image": (None,),
    "access_programs": (None,),
}
"""The Responses API's fields this server cannot honour, and the values that mean "not used"
(accepted): nothing is stored (``store`` must not be true, so no ``previous_response_id`` or
``conversation``), there are no tools, no background runs, no reasoning items, no truncation."""

RESPONSES_SUPPORTED = (
    "model, input, instructions, max_output_tokens, temperature, top_p, seed, stop, stream, "
    "text.format, include ['message.output_text.logprobs'], top_logprobs, logit_bias, "
    "metadata, user, refinement, and vLLM's sampling fields "
    "top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, min_tokens, ignore_eos"
)


class InputPart(BaseModel):
    """A content part of an input message: ``input_text`` (or ``output_text`` in an assistant
    message given back as history)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Text
    text: Text | None = None


class InputItem(BaseModel):
    """An item of ``input``: a message (``type`` "message" or absent, a ``role``, and content
    as a string or text parts). Other item types are rejected with a 400 naming the item."""

    # extra fields (an output message's "id", "status") are harmless; checked in plan_responses
    model_config = ConfigDict(extra="allow", strict=True)
    type: Text | None = None
    role: Text | None = None
    content: str | list[InputPart] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[InputPart] | None) -> str | list[InputPart] | None:
        return encodable(v) if isinstance(v, str) else v


class TextFormat(_Request):
    """``text.format``: plain text, any JSON object, or JSON matching ``schema``."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    """The kind of output."""
    name: Text | None = None
    """With "json_schema": the schema's name (not used)."""
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """With "json_schema": the JSON schema; bounded by SLHF_MAX_SCHEMA_BYTES and
    SLHF_MAX_SCHEMA_DEPTH."""
    description: Text | None = None
    """Not used."""
    strict: bool | None = None
    """Accepted: the answer is always constrained to the schema."""

    def as_response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            if self.schema_ is not None:
                raise ValueError("`schema` is only allowed with type 'json_schema'")
            return ResponseFormat(type=self.type)
        if self.schema_ is None:
            raise ValueError("`text.format.schema` is required with type 'json_schema'")
        spec = JsonSchemaSpec.model_validate(
            {"name": self.name or "schema", "schema": self.schema_}
        )
        return ResponseFormat(type="json_schema", json_schema=spec)


class TextConfig(_Request):
    """``text``: the output's format."""

    format: TextFormat | None = None
    """``{"type": "text"}`` (the default), ``{"type": "json_object"}`` or ``{"type":
    "json_schema", "name", "schema"}``: constrains every round that can end the refinement."""
    verbosity: Literal["medium"] | None = None
    """Accepted only as "medium" (the model's own verbosity)."""


class ResponsesStreamOptions(_Request):
    include_obfuscation: Literal[False] | None = None
    """Only false: stream events carry no obfuscation padding."""


class ResponsesRequest(VllmSamplingFields):
    """``POST /v1/responses``: the answer is the final round of the refinement."""

    model: Text | None = None
    """``<name>`` (refined), ``<name>:leader`` (no refinement) or ``<name>@upstream``."""
    input: Text | list[InputItem]
    """The question: a string (one user message), or a list of message items ending with the
    user's. Text content only."""
    instructions: Text | None = None
    """A system message put before ``input``."""
    max_output_tokens: MaxTokens | None = None
    """Most tokens per generation (the Leader's and each round's)."""
    temperature: Temperature | None = None
    """Sampling temperature, 0 (greedy) to 2, for every generation."""
    top_p: TopP | None = None
    """Nucleus sampling, for every generation."""
    seed: Seed | None = None
    """vLLM's extension: base seed; every round derives its own from it."""
    stop: Stop | None = None
    """vLLM's extension: up to 16 strings that end a generation."""
    stream: bool = False
    """Stream Server-Sent Events of the Responses API (``response.created`` ...
    ``response.completed``)."""
    stream_options: ResponsesStreamOptions | None = None
    """Only with ``stream``."""
    text: TextConfig | None = None
    """The output's format (``text.format``)."""
    top_logprobs: TopLogprobs | None = None
    """With ``include: ["message.output_text.logprobs"]``: alternatives per token, 0..20."""
    logit_bias: LogitBias | None = None
    """Token id (a string) -> bias (-100..100) added to its logit, in every generation."""
    refinement: RefinementOptions | None = None
    """The SLHF extension: rounds, a given answer, per-role sampling, the trace."""
    # harmless: accepted and ignored
    user: Text | None = None
    """Accepted and ignored."""
    metadata: dict[str, Any] | None = None
    """Accepted and ignored."""
    service_tier: Text | None = None
    """Accepted and ignored."""
    safety_identifier: Text | None = None
    """Accepted and ignored."""
    prompt_cache_key: Text | None = None
    """Accepted and ignored (the engine's prefix cache is automatic)."""
    # not supported: a request setting them to anything but their neutral value gets a 400
    previous_response_id: Any = unsupported()
    conversation: Any = unsupported()
    prompt: Any = unsupported()
    tools: Any = unsupported()
    tool_choice: Any = unsupported()
    parallel_tool_calls: Any = unsupported()
    max_tool_calls: Any = unsupported()
    background: Any = unsupported()
    background_options: Any = unsupported()
    store: Any = unsupported()
    include: Any = unsupported()
    reasoning: Any = unsupported()
    truncation: Any = unsupported()
    context_management: Any = unsupported()
    prompt_cache_options: Any = unsupported()
    prompt_cache_retention: Any = unsupported()
    moderation: Any = unsupported()
    image: Any = unsupported()
    access_programs: Any = unsupported()


# -- the response -------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[LogprobEntry] = Field(default_factory=list)
    """With ``include: ["message.output_text.logprobs"]``: the answer's (final round's) tokens."""


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Input tokens served from the engine's prefix cache (all rounds)."""
    cache_write_tokens: int = 0
    """Always 0: the engine's prefix cache is not billed."""


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0
    """Always 0: no reasoning tokens."""


class ResponsesUsage(BaseModel):
    """The Responses API's ``usage`` over every generation of the request (all rounds), plus
    ``by_role`` and ``by_round`` (round 0 = the first answer) as on the other OpenAI routes."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int
    by_role: dict[str, dict[str, int]] = Field(default_factory=dict)
    by_round: list[dict[str, int]] = Field(default_factory=list)


class IncompleteDetails(BaseModel):
    reason: str
    """"max_output_tokens": the final round reached ``max_output_tokens``."""


class ResponseObject(BaseModel):
    """A response of the Responses API; ``refinement`` (with ``refinement.return_trace``) is
    every round of the refinement."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, Any] | None = None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = False
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    store: bool = False
    background: bool = False
    previous_response_id: None = None
    reasoning: None = None
    user: str | None = None
    top_logprobs: int | None = None
    usage: ResponsesUsage | None = None
    refinement: RefinementTrace | None = None
    """Every round (``refinement.return_trace``): the first answer, the Follower rounds, why
    refinement stopped."""
