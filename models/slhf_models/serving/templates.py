"""Prompt templates for the two SLHF roles (docs/algorithm.md, "Templates: one model, two roles").

One chat model plays both roles through two prompts:

- Leader   ``T_L(x)``    = ``[user: x]`` + generation prompt                         -> ``y``
- Follower ``T_F(x, y)`` = ``[user: x] [assistant: y] [user: INSTRUCTION]`` + gen.  -> ``y'``

``x`` may be a single prompt string or a whole conversation (a list of chat messages ending
with a user turn); the Follower sees ``x`` and **only the previous answer** ``y``.

Models without a chat template use a documented plain-text layout (``PlainLayout``): the parts
are concatenated with a separator, the Leader prompt being ``x + sep`` and the Follower prompt
``x + sep + y + sep + INSTRUCTION + sep``. The stable part (``x``) comes first in both, so vLLM's
prefix cache reuses it across the Leader and every Follower round.

The template text is part of the trained artefact: the trainer and the server both import this
module, and the manifest records the instruction and layout a model was trained with.

Pure module: no torch, no transformers. A tokenizer is anything with the ``ChatTokenizer``
methods (a Hugging Face tokenizer satisfies it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Role = Literal["leader", "follower"]
ROLES: tuple[Role, Role] = ("leader", "follower")

#: The Follower instruction of the paper's reference code.
DEFAULT_FOLLOWER_INSTRUCTION = (
    "Improve the previous answer. Phrase it as if it was the original response."
)
#: Separator of the plain-text layout.
DEFAULT_PLAIN_SEPARATOR = "\n\n"

Message = dict[str, str]
#: ``x``: a prompt string, or a conversation (chat messages ending with a user turn).
Prompt = str | Sequence[Message]
CHAT_ROLES = ("system", "user", "assistant")


class TemplateError(ValueError):
    """A prompt cannot be put into a role template (bad messages, empty prompt...)."""


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the templates use."""

    chat_template: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...


@dataclass(frozen=True)
class TemplateConfig:
    """How prompts are laid out for the two roles.

    Attributes:
        follower_instruction: the user turn appended after the answer in ``T_F``.
        layout: ``"chat"`` uses the tokenizer's chat template (an error if it has none);
            ``"plain"`` uses the plain-text layout; ``"auto"`` picks chat when the tokenizer has
            a chat template, plain otherwise.
        plain_separator: separator between parts in the plain-text layout.
        bos: how a rendered prompt becomes ids. ``"ensure"`` (the paper's reference pipeline,
            TRL's ``tokenize_row``): the text is tokenized without special tokens, then the
            tokenizer's BOS is put first unless the ids already start with it, so the prompt
            has BOS exactly once whether or not the template writes it (Llama 3's tokenizer with
            the Tulu template, which does not) and none where the tokenizer has no BOS (Qwen).
            ``"as_rendered"`` (what ``slhf train`` used before 2026-12-06, and what a manifest
            without the field means): a chat template's text as it is, plain text with the
            tokenizer's own special tokens.
    """

    follower_instruction: str = DEFAULT_FOLLOWER_INSTRUCTION
    layout: Literal["auto", "chat", "plain"] = "auto"
    plain_separator: str = DEFAULT_PLAIN_SEPARATOR
    bos: Literal["ensure", "as_rendered"] = "ensure"

    def __post_init__(self) -> None:
        if not self.follower_instruction.strip():
            raise TemplateError("follower_instruction must not be empty")
        if self.layout not in ("auto", "chat", "plain"):
            raise TemplateError(f"layout must be 'auto', 'chat' or 'plain'; got {self.layout!r}")
        if not self.plain_separator:
            raise TemplateError("plain_separator must not be empty")
        if self.bos not in ("ensure", "as_rendered"):
            raise TemplateError(f"bos must be 'ensure' or 'as_rendered'; got {self.bos!r}")


def to_messages(prompt: Prompt) -> list[Message]:
    """Normalise ``x`` (a string or a conversation) into validated chat messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise TemplateError("prompt must not be empty")
        return [{"role": "user", "content": prompt}]
    messages = [dict(m) for m in prompt]
    if not messages:
        raise TemplateError("messages must contain at least one message")
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise TemplateError(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {role!r}"
            )
        if not isinstance(content, str):
            raise TemplateError(f"messages[{i}].content must be a string")
    if messages[-1]["role"] != "user":
        raise TemplateError(
            f"the last message must have role 'user' (the Leader answers it); "
            f"got {messages[-1]['role']!r}"
        )
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise TemplateError("messages must contain a non-empty user message")
    return messages


def leader_messages(prompt: Prompt) -> list[Message]:
    """``T_L(x)`` as chat messages: the conversation ``x`` itself."""
    return to_messages(prompt)


def follower_messages(
    prompt: Prompt, answer: str, instruction: str = DEFAULT_FOLLOWER_INSTRUCTION
) -> list[Message]:
    """``T_F(x, y)`` as chat messages: ``x``, ``[assistant: y]``, ``[user: instruction]``."""
    return [
        *to_messages(prompt),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": instruction},
    ]


SPLICE_PROBES: tuple[tuple[str | list[Message], str], ...] = (
    ("What is 2 + 2?", "The answer is 4."),
    ("Write a haiku.", " Leaves fall,\nquietly.\n"),
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "Hello! \u00e9t\u00e9 \u2713 42",
    ),
)
"""Prompts and answers ``TemplateRenderer.follower_tail`` checks the splice on: plain text,
surrounding whitespace and new lines, a conversation, non-ASCII text."""


class TemplateRenderer:
    """Renders role prompts to text and token ids for one tokenizer.

    ``render_*`` return the prompt text; ``encode_*`` return token ids ready for the engine
    (special tokens are added by the chat template itself, or by the tokenizer for plain text).
    """

    def __init__(self, tokenizer: ChatTokenizer, config: TemplateConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or TemplateConfig()
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if self.config.layout == "chat" and not has_chat:
            raise TemplateError(
                "template layout is 'chat' but the tokenizer has no chat_template; "
                "use layout 'plain' or a tokenizer with a chat template"
            )
        self.uses_chat = has_chat and self.config.layout != "plain"

    # -- text -------------------------------------------------------------------------------
    def render_leader(self, prompt: Prompt) -> str:
        messages = leader_messages(prompt)
        if self.uses_chat:
            return self._chat(messages)
        return self._plain([m["content"] for m in messages])

    def render_follower(self, prompt: Prompt, answer: str) -> str:
        instruction = self.config.follower_instruction
        if self.uses_chat:
            return self._chat(follower_messages(prompt, answer, instruction))
        parts = [m["content"] for m in to_messages(prompt)]
        return self._plain([*parts, answer, instruction])

    def render(self, role: Role, prompt: Prompt, answer: str | None) -> str:
        if role == "leader":
            return self.render_leader(prompt)
        if answer is None:
            raise TemplateError("the follower template needs the previous answer")
        return self.render_follower(prompt, answer)

    # -- token ids --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A rendered prompt's ids, under the config's BOS rule (``TemplateConfig.bos``): the
        one place the server, the trainer's rollouts and ``slhf eval`` turn prompts into ids."""
        if self.config.bos == "as_rendered":  # a chat template's specials, or the tokenizer's
            return list(self.tokenizer.encode(text, add_special_tokens=not self.uses_chat))
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if isinstance(bos, int) and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def encode_role(self, role: Role, prompt: Prompt, answer: str | None) -> list[int]:
        return self.encode(self.render(role, prompt, answer))

    def follower_tail(self) -> tuple[list[int] | None, str]:
        """The ids that follow the answer in ``T_F``, when this template has that shape.

        ``T_F(x, y)`` begins with ``T_L(x)`` and ``y``, so a Follower prompt can be spliced from
        the Leader's prompt ids, the answer's ids and a fixed tail -- and an engine's prefix
        cache then serves the whole Leader sequence. Checked here on ``SPLICE_PROBES``: the
        splice must give exactly the rendered ids. Returns ``(tail, "")``, or ``(None, why)``
        when it does not hold (a template that trims or rewrites the answer, a tokenizer that
        merges tokens across the boundaries): render every Follower prompt then.
        """
        tails = set()
        for prompt, answer in SPLICE_PROBES:
            lead = self.encode_role("leader", prompt, None)
            full = self.encode_role("follower", prompt, answer)
            mid = list(self.tokenizer.encode(answer, add_special_tokens=False))
            if full[: len(lead) + len(mid)] != lead + mid:
                return None, f"T_F(x, y) does not begin with T_L(x) + y for y={answer!r}"
            tails.add(tuple(full[len(lead) + len(mid) :]))
        if len(tails) != 1:
            return None, "the ids after the answer in T_F(x, y) depend on x or y"
        return list(tails.pop()), ""

    # -- helpers ----------------------------------------------------------------------------
    def _chat(self, messages: list[Message]) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise TemplateError("the tokenizer's chat template did not render to text")
        return text

    def _plain(self, parts: list[str]) -> str:
        sep = self.config.plain_separator
        return sep.join(parts) + sep
