"""The ``Engine`` protocol the refinement loop is written against, and its value types.

``slhf_server.vllm_engine.VllmEngine`` implements it on vLLM's ``AsyncLLM``; unit tests use a
scripted
fake. Nothing here imports vllm.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from slhf_models.serving.templates import ChatTokenizer, Role

FinishReason = Literal["stop", "length", "abort"]

# The engine's own limits, which the wire models use as their bounds (one bound, not two):
# tests/unit/server/test_vllm_engine_limits.py checks them against vLLM.
MAX_TEMPERATURE = 2.0
"""vLLM's ``SamplingParams`` refuses a temperature above 2."""
MAX_TOP_K = 2**31 - 1
"""vLLM keeps ``top_k`` in int32 tensors (a value at or above the vocabulary size means "no
top-k"); its serializer cannot pack integers of 2**64 and more."""
SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds are int64, as in the OpenAI API and vLLM's server."""


MAX_TOP_LOGPROBS = 20
"""vLLM's default ``max_logprobs`` (and OpenAI's bound on ``top_logprobs``)."""


@dataclass(frozen=True)
class OutputFormat:
    """A structured-output constraint on one generation: the text is JSON (``json_object``) or
    JSON matching ``schema`` (``json_schema``; the schema as JSON text)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability, and the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters of one generation (one role, one round)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # vLLM's extra sampling fields; the defaults are vLLM's neutral values
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    # structured outputs, log-probabilities, logit bias (None / empty: not used)
    output_format: OutputFormat | None = None
    logprobs: int | None = None
    """Return each generated token's log-probability and this many alternatives (0..20)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits, as OpenAI's ``logit_bias``."""


@dataclass(frozen=True)
class Generation:
    """What one engine request produced."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    token_ids: tuple[int, ...] | None = None
    """The generated ids whose detokenization is exactly ``text`` (a final EOS / stop token
    dropped); None when the engine cannot say (e.g. a stop string cut the text)."""
    cached_tokens: int | None = None
    """Prompt tokens served from the engine's prefix cache; None when the engine cannot say."""
    drafts: DraftCounts | None = None
    """Speculative-decoding acceptance; None when drafting is off."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """The generated tokens' log-probabilities, when ``GenerationParams.logprobs`` asked."""


@dataclass(frozen=True)
class DraftCounts:
    """Draft tokens a speculative decoder proposed for one generation, and how many the target
    model accepted (the rest were rejected and recomputed)."""

    accepted: int
    drafted: int

    @property
    def rejected(self) -> int:
        return self.drafted - self.accepted


@dataclass(frozen=True)
class GenerationDelta:
    """A piece of a streamed generation: the text and tokens added since the previous delta.

    ``finish_reason`` is set on the last delta only.
    """

    text: str
    new_tokens: int
    finish_reason: FinishReason | None = None
    token_ids: tuple[int, ...] | None = None
    """The new tokens' ids (``Generation.token_ids``; on the last delta, a dropped final EOS
    / stop token is not in them); None when the engine cannot say."""
    cached_tokens: int | None = None
    """As ``Generation.cached_tokens``; set on the last delta."""
    drafts: DraftCounts | None = None
    """As ``Generation.drafts``; set on the last delta."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """The new tokens' log-probabilities, when asked."""


class EngineError(RuntimeError):
    """The engine failed or is gone; requests cannot be served."""


class Engine(Protocol):
    """Generates text for a role. Concurrent calls must batch inside the engine.

    ``generate`` and ``stream`` raise ``EngineError`` when the engine fails, and one of
    ``slhf_server.errors.REQUEST_REJECTIONS`` (``ValueError``, ``TypeError``, ``OverflowError``)
    when it rejects the request's values; the refiner turns the latter into a 400."""

    def tokenizer(self, role: Role) -> ChatTokenizer:
        """The tokenizer of the model playing ``role``."""
        ...

    def max_model_len(self, role: Role) -> int:
        """Context length (prompt + completion tokens) of the model playing ``role``."""
        ...

    async def generate(
        self, role: Role, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> Generation:
        """Run one request to completion. Cancelling the awaiting task aborts it in the engine."""
        ...

    def stream(
        self, role: Role, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        """Run one request, yielding text as it is generated. Closing the iterator aborts it."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise ``EngineError`` when the engine is dead."""
        ...

    def num_running(self) -> int:
        """Requests the engine has not finished (all roles)."""
        ...

    async def shutdown(self) -> None: ...
