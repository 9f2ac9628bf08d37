"""Typed results mirroring the server's wire contract (docs/wire.md).

The server may add fields at any time; parsing keeps the ones named here and ignores the rest,
so an older client keeps working against a newer server. ``raw`` keeps the whole body. A missing
field reads as its default (0, "", ``None``); an object or list field that holds another JSON
type reads as empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def json_object(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def json_objects(value: object) -> list[dict[str, Any]]:
    """The JSON objects of ``value`` if it is a list (anything else in it is skipped)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    return int(v) if v is not None else 0


def _float(d: dict[str, Any], key: str) -> float:
    v = d.get(key)
    return float(v) if v is not None else 0.0


def _str_or_none(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    return None if v is None else str(v)


def _ints(value: object) -> dict[str, int]:
    """A JSON object of counts, such as one ``by_role`` entry."""
    d = json_object(value)
    return {str(k): _int(d, k) for k in d}


def _trace(value: object) -> RefinementTrace | None:
    return RefinementTrace.from_dict(value) if isinstance(value, dict) and value else None


def _number(d: dict[str, Any], key: str) -> float:
    """A JSON number, else 0.0 (a log-probability field of any other type)."""
    v = d.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def _bytes(value: object) -> list[int]:
    return [b for b in value if isinstance(b, int)] if isinstance(value, list) else []


@dataclass(frozen=True)
class TopLogprob:
    """One likely alternative at a token's position."""

    token: str
    logprob: float
    bytes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TokenLogprob:
    """One token of an answer with its log-probability and the most likely alternatives
    (OpenAI's ``logprobs.content`` entries)."""

    token: str
    logprob: float
    bytes: list[int] = field(default_factory=list)
    top_logprobs: list[TopLogprob] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenLogprob:
        return cls(
            token=str(d.get("token", "")),
            logprob=_number(d, "logprob"),
            bytes=_bytes(d.get("bytes")),
            top_logprobs=[
                TopLogprob(str(t.get("token", "")), _number(t, "logprob"), _bytes(t.get("bytes")))
                for t in json_objects(d.get("top_logprobs"))
            ],
        )


def token_logprobs(value: object) -> list[TokenLogprob] | None:
    """The tokens of a ``logprobs`` list; None when there is none (not asked for)."""
    if not isinstance(value, list):
        return None
    return [TokenLogprob.from_dict(t) for t in json_objects(value)]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Usage:
        d = d or {}
        return cls(_int(d, "prompt_tokens"), _int(d, "completion_tokens"), _int(d, "total_tokens"))


@dataclass(frozen=True)
class LeaderAnswer:
    """Round 0: the first answer. ``source``: "leader", "given" or "upstream"."""

    text: str
    source: str
    finish_reason: str | None
    usage: Usage
    latency_ms: float
    logprobs: list[TokenLogprob] | None = None
    """This step's tokens with their log-probabilities (when asked for)."""
    output_format: str | None = None
    """The structured-output constraint it was generated under ("json_object",
    "json_schema"), if any."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LeaderAnswer:
        return cls(
            text=str(d.get("text", "")),
            source=str(d.get("source", "leader")),
            finish_reason=_str_or_none(d, "finish_reason"),
            usage=Usage.from_dict(json_object(d.get("usage"))),
            latency_ms=_float(d, "latency_ms"),
            logprobs=token_logprobs(d.get("logprobs")),
            output_format=_str_or_none(d, "output_format"),
        )


@dataclass(frozen=True)
class Round:
    """One Follower round (``round`` counts from 1)."""

    round: int
    text: str
    finish_reason: str | None
    usage: Usage
    latency_ms: float
    logprobs: list[TokenLogprob] | None = None
    """This round's tokens with their log-probabilities (when asked for)."""
    output_format: str | None = None
    """The structured-output constraint it was generated under, if any."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Round:
        return cls(
            round=_int(d, "round"),
            text=str(d.get("text", "")),
            finish_reason=_str_or_none(d, "finish_reason"),
            usage=Usage.from_dict(json_object(d.get("usage"))),
            latency_ms=_float(d, "latency_ms"),
            logprobs=token_logprobs(d.get("logprobs")),
            output_format=_str_or_none(d, "output_format"),
        )


@dataclass(frozen=True)
class RefinementTrace:
    """The Leader answer, every round, and why refinement stopped."""

    leader: LeaderAnswer
    rounds: list[Round]
    stopped_reason: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefinementTrace:
        return cls(
            leader=LeaderAnswer.from_dict(json_object(d.get("leader"))),
            rounds=[Round.from_dict(r) for r in json_objects(d.get("rounds"))],
            stopped_reason=str(d.get("stopped_reason", "")),
        )

    @property
    def texts(self) -> list[str]:
        """Round 0 (the Leader answer) and every round's text, in order."""
        return [self.leader.text, *(r.text for r in self.rounds)]

    @property
    def final_logprobs(self) -> list[TokenLogprob] | None:
        """The answer's tokens: the last round's (the Leader's with no rounds)."""
        return self.rounds[-1].logprobs if self.rounds else self.leader.logprobs


@dataclass(frozen=True)
class Refinement(RefinementTrace):
    """The response of ``POST /v1/refine``."""

    id: str = ""
    model: str = ""
    created: int = 0
    final: str = ""
    usage: Usage = field(default_factory=Usage)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Refinement:
        t = RefinementTrace.from_dict(d)
        return cls(
            leader=t.leader,
            rounds=t.rounds,
            stopped_reason=t.stopped_reason,
            id=str(d.get("id", "")),
            model=str(d.get("model", "")),
            created=_int(d, "created"),
            final=str(d.get("final", "")),
            usage=Usage.from_dict(json_object(d.get("usage"))),
            raw=d,
        )


@dataclass(frozen=True)
class ChatUsage(Usage):
    """OpenAI ``usage`` plus ``by_role`` and ``by_round`` (round 0 = the first answer)."""

    by_role: dict[str, dict[str, int]] = field(default_factory=dict)
    by_round: list[dict[str, int]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ChatUsage:
        d = d or {}
        base = Usage.from_dict(d)
        return cls(
            base.prompt_tokens,
            base.completion_tokens,
            base.total_tokens,
            by_role={str(k): _ints(v) for k, v in json_object(d.get("by_role")).items()},
            by_round=[_ints(r) for r in json_objects(d.get("by_round"))],
        )


@dataclass(frozen=True)
class ChatChoice:
    index: int
    content: str
    finish_reason: str | None
    refinement: RefinementTrace | None
    logprobs: list[TokenLogprob] | None = None
    """With ``logprobs``: the answer's tokens (the final round's)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatChoice:
        message = json_object(d.get("message"))
        return cls(
            index=_int(d, "index"),
            content=str(message.get("content") or ""),
            finish_reason=_str_or_none(d, "finish_reason"),
            refinement=_trace(d.get("refinement")),
            logprobs=token_logprobs(json_object(d.get("logprobs")).get("content")),
        )


@dataclass(frozen=True)
class ChatCompletion:
    """The response of ``POST /v1/chat/completions``; ``content`` is choice 0's final answer."""

    id: str
    model: str
    created: int
    choices: list[ChatChoice]
    usage: ChatUsage
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def content(self) -> str:
        return self.choices[0].content if self.choices else ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatCompletion:
        return cls(
            id=str(d.get("id", "")),
            model=str(d.get("model", "")),
            created=_int(d, "created"),
            choices=[ChatChoice.from_dict(c) for c in json_objects(d.get("choices"))],
            usage=ChatUsage.from_dict(json_object(d.get("usage"))),
            raw=d,
        )


@dataclass(frozen=True)
class ChatChunk:
    """One streamed event of one choice.

    ``text`` is new content of round ``round`` (with ``stream_rounds`` every round streams, and a
    UI resets its text when ``round`` changes). The last chunk of a choice has ``finish_reason``
    (and ``refinement`` when a trace was asked for); a final usage-only chunk has ``index`` -1,
    ``round`` the last round any choice ran, and ``usage``. The stream's opening chunk (the
    assistant role, no text) is not yielded: every chunk has a ``round`` and something in it.
    """

    index: int
    text: str
    round: int = 0
    finish_reason: str | None = None
    refinement: RefinementTrace | None = None
    usage: ChatUsage | None = None


def chunks_from_event(body: dict[str, Any]) -> list[ChatChunk]:
    """The chunks of one SSE ``data:`` object of a chat or text completion stream."""
    out: list[ChatChunk] = []
    for c in json_objects(body.get("choices")):
        delta = c.get("delta")
        text = json_object(delta).get("content") if delta is not None else c.get("text")
        trace = _trace(c.get("refinement"))
        finish_reason = _str_or_none(c, "finish_reason")
        if not text and finish_reason is None and trace is None:
            continue  # the opening role chunk: nothing to show
        out.append(
            ChatChunk(
                index=_int(c, "index"),
                text=str(text or ""),
                round=_int(c, "round"),
                finish_reason=finish_reason,
                refinement=trace,
            )
        )
    if not body.get("choices") and body.get("usage"):
        usage = ChatUsage.from_dict(json_object(body["usage"]))
        last_round = max(len(usage.by_round) - 1, 0)
        out.append(ChatChunk(index=-1, text="", round=last_round, usage=usage))
    return out


@dataclass(frozen=True)
class Model:
    """One entry of ``GET /v1/models``; ``slhf`` holds topology, rounds, template, manifest."""

    id: str
    root: str
    parent: str | None
    max_model_len: int
    slhf: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Model:
        return cls(
            id=str(d.get("id", "")),
            root=str(d.get("root", "")),
            parent=_str_or_none(d, "parent"),
            max_model_len=_int(d, "max_model_len"),
            slhf=dict(json_object(d.get("slhf"))),
        )
