"""The ``Engine`` protocol the refinement loop is written against, and its value types.

``server.engine.VllmEngine`` implements it on vLLM's ``AsyncLLM``; unit tests use a scripted
fake. Nothing here imports vllm.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from models.templates import ChatTokenizer, Role

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters of one generation (one role, one round)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Generation:
    """What one engine request produced."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class GenerationDelta:
    """A piece of a streamed generation: the text and tokens added since the previous delta.

    ``finish_reason`` is set on the last delta only.
    """

    text: str
    new_tokens: int
    finish_reason: FinishReason | None = None


class EngineError(RuntimeError):
    """The engine failed or is gone; requests cannot be served."""


class Engine(Protocol):
    """Generates text for a role. Concurrent calls must batch inside the engine."""

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
