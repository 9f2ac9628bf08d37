"""Wire models of the SLHF routes (DESIGN.md "Wire contract").

Names are fixed; add fields, never rename.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.generation import FinishReason

StoppedReason = Literal["max_rounds", "unchanged", "deadline", "context_length"]
AnswerSource = Literal["leader", "given", "upstream"]


class _Request(BaseModel):
    # Unknown fields are an error, so a typo ("round") is reported instead of ignored.
    model_config = ConfigDict(extra="forbid")


class SamplingParams(_Request):
    """Per-role sampling; unset fields take the manifest's defaults for that role."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("top_k must be -1 (disabled) or >= 1; got 0")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings are allowed; got {len(stops)}")
        return v


class LeaderParams(SamplingParams):
    """The Leader's sampling, and where the first answer comes from."""

    source: Literal["leader", "upstream"] = "leader"
    """"upstream": ask the upstream server (SLHF_UPSTREAM_*) for the first answer."""


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str


class RefineRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    response: str | None = None
    """An answer to refine instead of a Leader answer (``leader.source`` = "given")."""
    rounds: int | None = None
    """Follower rounds; default: the model's default rounds. Range 0..SLHF_MAX_ROUNDS."""
    leader: LeaderParams | None = None
    follower: SamplingParams | None = None
    stop_when_unchanged: bool = True
    seed: int | None = None
    """Base seed for every round (a role's own ``seed`` takes precedence for that role)."""
    deadline_s: float | None = Field(None, gt=0)
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


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class LeaderAnswer(BaseModel):
    text: str
    source: AnswerSource
    finish_reason: FinishReason | None
    usage: Usage
    latency_ms: float


class RoundResult(BaseModel):
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
