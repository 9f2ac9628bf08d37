"""Fakes for fast unit tests: a reversible tokenizer and a scripted engine.

``CharTokenizer`` encodes one token per character (ids are code points), so a fake engine can
decode every prompt exactly and tests can assert on what each role was shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from slhf_models.serving.templates import Role
from slhf_server.engine import (
    DraftCounts,
    EngineError,
    FinishReason,
    Generation,
    GenerationDelta,
    GenerationParams,
    TokenLogprob,
)


class CharTokenizer:
    """One token per character; a chat template ``<|role|>content\\n`` lines."""

    chat_template = "fake"

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in conversation)
        return text + ("<|assistant|>" if kwargs.get("add_generation_prompt") else "")

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return [ord(c) for c in text]

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


@dataclass
class Call:
    role: Role
    prompt: str
    params: GenerationParams
    request_id: str


Script = Callable[[Call], str]


@dataclass
class ScriptedEngine:
    """Answers each generation with ``script(call)``; records every call."""

    script: Script
    context: int = 4096
    delay: float = 0.0
    calls: list[Call] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    dead: bool = False
    peak_running: int = 0
    fail_stream_after: int | None = None
    """When set, a streamed generation raises ``EngineError`` after this many deltas."""
    prefix_cache: bool = False
    """Report what a per-token prefix cache would serve (the longest prefix shared with an
    earlier request's prompt + output ids) and the generated ids (``CharTokenizer`` ids)."""
    drafts: DraftCounts | None = None
    """Reported as every generation's speculative-decoding acceptance."""
    sequences: list[list[int]] = field(default_factory=list)

    def _cached(
        self, prompt_token_ids: list[int], text: str
    ) -> tuple[tuple[int, ...] | None, int | None]:
        if not self.prefix_cache:
            return None, None
        best = 0
        for seq in self.sequences:
            n = 0
            while n < min(len(seq), len(prompt_token_ids)) and seq[n] == prompt_token_ids[n]:
                n += 1
            best = max(best, n)
        ids = tuple(ord(c) for c in text)
        self.sequences.append([*prompt_token_ids, *ids])
        return ids, best

    def tokenizer(self, role: Role) -> CharTokenizer:
        return CharTokenizer()

    def max_model_len(self, role: Role) -> int:
        return self.context

    async def generate(
        self, role: Role, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> Generation:
        words, finish = await self._answer(role, prompt_token_ids, params, request_id)
        ids, cached = self._cached(prompt_token_ids, " ".join(words))
        return Generation(
            text=" ".join(words),
            prompt_tokens=len(prompt_token_ids),
            completion_tokens=len(words),
            finish_reason=finish,
            token_ids=ids,
            cached_tokens=cached,
            drafts=self.drafts,
            logprobs=None
            if params.logprobs is None
            else tuple(word_logprob(i, w, params.logprobs) for i, w in enumerate(words)),
        )

    async def stream(
        self, role: Role, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        """One word per delta ("a", " b", " c"), the finish reason on the last one."""
        words, finish = await self._answer(role, prompt_token_ids, params, request_id)
        ids, cached = self._cached(prompt_token_ids, " ".join(words))
        for i, word in enumerate(words):
            if self.fail_stream_after is not None and i >= self.fail_stream_after:
                raise EngineError("engine failed mid-stream")
            await asyncio.sleep(0)
            last = i == len(words) - 1
            piece = word if i == 0 else " " + word
            yield GenerationDelta(
                text=piece,
                new_tokens=1,
                finish_reason=finish if last else None,
                token_ids=None if ids is None else tuple(ord(c) for c in piece),
                cached_tokens=cached if last else None,
                drafts=self.drafts if last else None,
                logprobs=None
                if params.logprobs is None
                else (word_logprob(i, word, params.logprobs),),
            )
        if not words:
            yield GenerationDelta("", 0, finish, None if ids is None else (), cached, self.drafts)

    async def _answer(
        self, role: Role, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> tuple[list[str], FinishReason]:
        if self.dead:
            raise EngineError("engine is dead")
        call = Call(role, CharTokenizer.decode(prompt_token_ids), params, request_id)
        self.calls.append(call)
        self.running.add(request_id)
        self.peak_running = max(self.peak_running, len(self.running))
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            text = self.script(call)
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise
        finally:
            self.running.discard(request_id)
        words = text.split()
        finish: FinishReason = "length" if len(words) > params.max_tokens else "stop"
        return words[: params.max_tokens], finish

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineError("engine is dead")

    def num_running(self) -> int:
        return len(self.running)

    async def shutdown(self) -> None:
        pass


def word_logprob(i: int, word: str, top: int) -> TokenLogprob:
    """The fake's log-probability of its ``i``-th word (a token per word, its leading space
    included), with ``top`` made-up alternatives."""
    token = word if i == 0 else " " + word
    return TokenLogprob(token, -0.5, tuple((f"alt{k}", -1.0 - k) for k in range(top)))


def numbered_script(call: Call) -> str:
    """Leader says 'answer 0'; round i of the Follower says 'answer i' (from the request id)."""
    index = call.request_id.rsplit("-", 1)[1]
    return f"answer {index}"


class StrictCharTokenizer(CharTokenizer):
    """Refuses lone surrogates with a ``TypeError``, as Hugging Face fast tokenizers do."""

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]") from None
        return super().encode(text, **kwargs)


@dataclass
class VllmLikeEngine(ScriptedEngine):
    """A scripted engine that rejects what vLLM 0.32 rejects (``slhf_server.engine``'s limits):
    a
    temperature above 2 (``ValueError``), an integer its serializer cannot pack
    (``OverflowError``), a stop string UTF-8 cannot encode (``UnicodeEncodeError``)."""

    def tokenizer(self, role: Role) -> CharTokenizer:
        return StrictCharTokenizer()

    async def _answer(
        self, role: Role, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> tuple[list[str], FinishReason]:
        if not 0 <= params.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {params.temperature}.")
        for value in (params.top_k, params.seed or 0, params.max_tokens):
            if not -(2**63) <= value < 2**64:
                raise OverflowError("int too big to convert")
        for stop in params.stop:
            stop.encode("utf-8")
        return await super()._answer(role, prompt_token_ids, params, request_id)
