"""Role prompts as engine token ids, and the Follower prompt spliced from the Leader's sequence.

``T_F(x, y)`` begins with the Leader's own sequence ``T_L(x) + y``. When the template has that
shape (``TemplateRenderer.follower_tail``, checked once at start) and both roles share one
tokenizer, a Follower prompt is built as *the Leader's prompt ids + the answer's generated ids +
the template's tail*, so vLLM's prefix cache serves the whole Leader sequence to round 1 instead
of prefilling it again (docs/performance.md). The answer's ids are the ones the engine generated
(they detokenize to the answer's text); a re-rendering would re-tokenize the text, which can
split it differently. Where the splice does not hold, or the answer's ids are unknown (a given
or upstream answer, a stop string), the prompt is rendered.

Rendering and tokenizing are CPU work: they run in one worker thread per tokenizer, never on the
event loop (docs/reliability.md). A rendered prompt whose text needs more tokens than the context
holds -- by the tokenizer's ``TokenBound`` (``slhf_server.token_bound``), from its length alone --
is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from slhf_models.serving.templates import Message, Role, TemplateError, TemplateRenderer
from slhf_server.engine import Engine
from slhf_server.errors import REQUEST_REJECTIONS, PromptTooLongError, request_rejected
from slhf_server.token_bound import TokenBound, token_bound

logger = logging.getLogger("slhf.refine")

T = TypeVar("T")

_WHAT = {"leader": "Leader prompt", "follower": "Follower prompt (prompt + answer + instruction)"}


class Prompts:
    """Token ids of the role prompts for one engine and one template renderer per role."""

    def __init__(self, engine: Engine, renderers: dict[Role, TemplateRenderer]) -> None:
        self.engine = engine
        self.renderers = renderers
        self.follower_tail: list[int] | None = None
        """The ids after the answer in ``T_F``; None = every Follower prompt is rendered."""
        self.bounds: dict[Role, TokenBound | None] = {}
        """Each role's tokenizer's bound (None: its prompts are measured by tokenizing)."""
        self._threads: dict[Role, ThreadPoolExecutor] = {}
        by_tokenizer: dict[int, tuple[TokenBound | None, ThreadPoolExecutor]] = {}
        for role, renderer in renderers.items():
            key = id(renderer.tokenizer)
            if key not in by_tokenizer:
                bound, why = token_bound(renderer.tokenizer)
                if bound is None:
                    logger.info("no length bound for the %s tokenizer (%s)", role, why)
                pool = ThreadPoolExecutor(1, thread_name_prefix=f"slhf-tokenizer-{role}")
                by_tokenizer[key] = (bound, pool)
            self.bounds[role], self._threads[role] = by_tokenizer[key]
        leader, follower = renderers["leader"], renderers["follower"]
        if leader.tokenizer is not follower.tokenizer or leader.config != follower.config:
            return  # two models (or templates): the Leader's ids mean nothing to the Follower
        self.follower_tail, why = follower.follower_tail()
        if self.follower_tail is None:
            logger.info(
                "Follower prompts are rendered, not spliced from the Leader's sequence (no "
                "prefix-cache reuse of the Leader's answer): %s",
                why,
            )

    async def off_loop(self, role: Role, work: Callable[[], T]) -> T:
        """``work()`` in the worker thread of ``role``'s tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(self._threads[role], work)

    async def ids(
        self, role: Role, prompt: str | Sequence[Message], answer: str | None, param: str = "prompt"
    ) -> list[int]:
        """The role's prompt as token ids, rendered and tokenized off the event loop; a prompt
        that leaves no room to generate is a ``PromptTooLongError`` (refused before tokenizing
        when its length alone says so), what the tokenizer rejects a 400."""
        return await self.off_loop(role, lambda: self.fitting_ids(role, prompt, answer, param))

    def fitting_ids(
        self, role: Role, prompt: str | Sequence[Message], answer: str | None, param: str
    ) -> list[int]:
        """``ids`` on the calling thread (the worker's)."""
        renderer = self.renderers[role]
        try:
            text = renderer.render(role, prompt, answer)
            self._check_bound(role, text, param)
            ids = renderer.encode(text)
        except (TemplateError, PromptTooLongError):
            raise
        except REQUEST_REJECTIONS as e:
            raise request_rejected(e, f"the {role} tokenizer") from e
        self.check_fits(role, ids, param)
        return ids

    def _check_bound(self, role: Role, text: str, param: str) -> None:
        bound = self.bounds[role]
        if bound is None:
            return
        least = bound.min_tokens(text)
        limit = self.engine.max_model_len(role)
        if least >= limit:
            raise PromptTooLongError(
                f"{_WHAT[role]} has at least {least:,} tokens ({len(text):,} characters; no "
                f"token of this tokenizer covers more than {bound.max_chars:,} characters or "
                f"{bound.max_bytes:,} bytes); max_model_len is {limit:,}, which leaves no room "
                f"to generate. Shorten the {param}.",
                param=param,
            )

    async def follower_ids(
        self,
        prompt: str | Sequence[Message],
        answer: str,
        leader_ids: Sequence[int] | None,
        answer_ids: Sequence[int] | None,
    ) -> list[int]:
        """``T_F(prompt, answer)``: spliced when the Leader's prompt ids and the answer's
        generated ids are known and the template allows it, rendered otherwise; a
        ``PromptTooLongError`` when it leaves no room to generate."""
        if self.follower_tail is None or leader_ids is None or answer_ids is None:
            return await self.ids("follower", prompt, answer)
        ids = [*leader_ids, *answer_ids, *self.follower_tail]
        self.check_fits("follower", ids)
        return ids

    def check_fits(self, role: Role, ids: list[int], param: str = "prompt") -> None:
        """Raise ``PromptTooLongError`` when ``ids`` leave no room for a single new token."""
        limit = self.engine.max_model_len(role)
        if len(ids) >= limit:
            raise PromptTooLongError(
                f"{_WHAT[role]} has {len(ids):,} tokens; max_model_len is {limit:,}, which "
                f"leaves no room to generate. Shorten the {param}.",
                param=param,
            )

    def close(self) -> None:
        """Stop the worker threads (work already queued finishes first)."""
        for pool in set(self._threads.values()):
            pool.shutdown(wait=False, cancel_futures=True)
