"""Role prompts as engine token ids, and the Follower prompt spliced from the Leader's sequence.

``T_F(x, y)`` begins with the Leader's own sequence ``T_L(x) + y``. When the template has that
shape (``TemplateRenderer.follower_tail``, checked once at start) and both roles share one
tokenizer, a Follower prompt is built as *the Leader's prompt ids + the answer's generated ids +
the template's tail*, so vLLM's prefix cache serves the whole Leader sequence to round 1 instead
of prefilling it again (docs/performance.md). The answer's ids are the ones the engine generated
(they detokenize to the answer's text); a re-rendering would re-tokenize the text, which can
split it differently. Where the splice does not hold, or the answer's ids are unknown (a given
or upstream answer, a stop string), the prompt is rendered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from slhf_models.serving.templates import Message, Role, TemplateError, TemplateRenderer
from slhf_server.engine import Engine
from slhf_server.errors import REQUEST_REJECTIONS, PromptTooLongError, request_rejected

logger = logging.getLogger("slhf.refine")


class Prompts:
    """Token ids of the role prompts for one engine and one template renderer per role."""

    def __init__(self, engine: Engine, renderers: dict[Role, TemplateRenderer]) -> None:
        self.engine = engine
        self.renderers = renderers
        self.follower_tail: list[int] | None = None
        """The ids after the answer in ``T_F``; None = every Follower prompt is rendered."""
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

    def ids(self, role: Role, prompt: str | Sequence[Message], answer: str | None) -> list[int]:
        """The role's prompt as token ids; what the tokenizer rejects is a 400."""
        try:
            return self.renderers[role].encode_role(role, prompt, answer)
        except TemplateError:
            raise
        except REQUEST_REJECTIONS as e:
            raise request_rejected(e, f"the {role} tokenizer") from e

    def follower_ids(
        self,
        prompt: str | Sequence[Message],
        answer: str,
        leader_ids: Sequence[int] | None,
        answer_ids: Sequence[int] | None,
    ) -> list[int]:
        """``T_F(prompt, answer)``: spliced when the Leader's prompt ids and the answer's
        generated ids are known and the template allows it, rendered otherwise."""
        if self.follower_tail is None or leader_ids is None or answer_ids is None:
            return self.ids("follower", prompt, answer)
        return [*leader_ids, *answer_ids, *self.follower_tail]

    def check_fits(self, role: Role, ids: list[int], param: str = "prompt") -> None:
        """Raise ``PromptTooLongError`` when ``ids`` leave no room for a single new token."""
        limit = self.engine.max_model_len(role)
        if len(ids) >= limit:
            what = (
                "Leader prompt"
                if role == "leader"
                else "Follower prompt (prompt + answer + instruction)"
            )
            raise PromptTooLongError(
                f"{what} has {len(ids):,} tokens; max_model_len is {limit:,}, which leaves no "
                f"room to generate. Shorten the {param}.",
                param=param,
            )
