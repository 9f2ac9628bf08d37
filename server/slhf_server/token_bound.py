"""How few tokens a text can tokenize to, from the tokenizer's vocabulary (docs/reliability.md).

A text that cannot fit the context must be refused before it is tokenized: tokenizing the 4 MiB a
request body may hold takes seconds. ``TokenBound`` is computed once per tokenizer at start-up:

- ``max_bytes``: the most UTF-8 bytes of (normalized) text one token covers -- a byte-level BPE
  token's own bytes (which may be part of a character), an added token's content;
- ``max_chars``: the most characters one token touches: a token of bytes ``b`` touches at most
  one character per byte that starts a character in ``b``, plus one when ``b`` starts inside a
  character.

Every byte of the normalized text is covered by exactly one token, and every character by at
least one, so a text of ``C`` characters and ``B`` bytes (after the tokenizer's own
normalization) needs at least ``max(ceil(C / max_chars), ceil(B / max_bytes))`` tokens. The bound
is exact for tokenizers that lose nothing: byte-level BPE (GPT-2, Llama 3, Qwen) whose
vocabulary holds all 256 bytes, and BPE with byte fallback (Llama 2, Mistral), with pre-tokenizers
that only split or lengthen the text. Any other tokenizer (WordPiece's ``[UNK]`` for a whole word,
an added token that swallows the whitespace around it, a pre-tokenizer that drops whitespace)
can turn an arbitrarily long text into few tokens: it gets no bound (``token_bound`` returns
None) and its prompts are tokenized to be measured -- off the event loop either way.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("slhf_server")

Normalize = Callable[[str], str]

_KEEPING_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split", "Sequence"}
)
"""Pre-tokenizers that split the text, or lengthen it (a prefix space, ``▁`` for a space), and
never drop any of it (``Split`` only without the "removed" behaviour)."""
_UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD")


def chars_touched(token: bytes) -> int:
    """How many characters a token of UTF-8 bytes ``token`` can touch in a text."""
    starts = sum(1 for b in token if b & 0xC0 != 0x80)
    return starts + (1 if token and token[0] & 0xC0 == 0x80 else 0)


@dataclass(frozen=True)
class TokenBound:
    """The longest token of one tokenizer, in bytes and in characters of normalized text."""

    max_bytes: int
    max_chars: int
    normalize: Normalize | None = None
    """The tokenizer's normalization (None: it has none)."""

    @classmethod
    def of(
        cls, tokens: Iterable[bytes], added: Iterable[str], normalize: Normalize | None = None
    ) -> TokenBound:
        """The bound of a vocabulary: each model token's bytes, each added token's content."""
        max_bytes = max_chars = 1
        for b in tokens:
            max_bytes = max(max_bytes, len(b))
            max_chars = max(max_chars, chars_touched(b))
        for content in added:
            forms = [content] if normalize is None else [content, normalize(content)]
            for text in forms:
                max_bytes = max(max_bytes, len(text.encode("utf-8", "surrogatepass")))
                max_chars = max(max_chars, len(text))
        return cls(max_bytes, max_chars, normalize)

    def min_tokens(self, text: str) -> int:
        """The fewest tokens ``text`` can encode to (special tokens a tokenizer adds come on
        top)."""
        if self.normalize is not None:
            text = self.normalize(text)
        chars = len(text)
        size = len(text.encode("utf-8", "surrogatepass"))
        return max(-(-chars // self.max_chars), -(-size // self.max_bytes))


def byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE writes for each byte (GPT-2's reversible map):
    printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


def _types(spec: dict[str, Any] | None, nested: str) -> list[dict[str, Any]]:
    """A component's spec and, for a ``Sequence``, its members (flattened)."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [t for member in spec.get(nested, []) for t in _types(member, nested)]
    return [spec]


@dataclass(frozen=True)
class _Step:
    """One normalization step as Python string operations."""

    kind: str
    a: str = ""
    b: str = ""

    def __call__(self, text: str) -> str:
        if self.kind in _UNICODE_FORMS:
            return unicodedata.normalize(self.kind, text)  # type: ignore[arg-type]
        if self.kind == "Prepend":
            return self.a + text if text else text
        return text.replace(self.a, self.b)  # "Replace"


@dataclass(frozen=True)
class _Steps:
    steps: tuple[_Step, ...]

    def __call__(self, text: str) -> str:
        for step in self.steps:
            text = step(text)
        return text


def _python_normalizer(spec: dict[str, Any] | None) -> Normalize | bool | None:
    """The normalizer as Python string operations where they are the same (Unicode forms,
    literal replacements, prepending), None for no normalizer, False when it has to be the
    tokenizer's own (slower) code."""
    steps: list[_Step] = []
    for step in _types(spec, "normalizers"):
        kind = str(step.get("type"))
        if kind in _UNICODE_FORMS:
            steps.append(_Step(kind))
        elif kind == "Prepend":
            steps.append(_Step(kind, str(step["prepend"])))
        elif kind == "Replace" and set(step.get("pattern", {})) == {"String"}:
            steps.append(_Step(kind, str(step["pattern"]["String"]), str(step["content"])))
        else:
            return False
    return _Steps(tuple(steps)) if steps else None


def token_bound(tokenizer: object) -> tuple[TokenBound | None, str]:
    """The bound of a Hugging Face fast tokenizer, or (None, why) when it cannot have one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, "not a fast (Rust) tokenizer"
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"a {model.get('type')} model (an unknown word can be one token)"
    for pre in _types(spec.get("pre_tokenizer"), "pretokenizers"):
        if pre.get("type") not in _KEEPING_PRE_TOKENIZERS or pre.get("behavior") == "Removed":
            return None, f"the pre-tokenizer {pre.get('type')} can drop text"
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") for a in added):
        return None, "an added token swallows the whitespace around it"
    vocab: dict[str, int] = model.get("vocab") or {}
    pres = {p.get("type") for p in _types(spec.get("pre_tokenizer"), "pretokenizers")}
    alphabet = byte_level_alphabet()
    if "ByteLevel" in pres:
        if not set(alphabet) <= set(vocab):
            return None, "a byte-level vocabulary without all 256 bytes"
        tokens = [bytes(alphabet.get(c, 0) for c in piece) for piece in vocab]
    elif model.get("byte_fallback"):
        if any(f"<0x{b:02X}>" not in vocab for b in range(256)):
            return None, "byte fallback without all 256 byte tokens"
        tokens = [piece.encode("utf-8", "surrogatepass") for piece in vocab]
    else:
        return None, "a BPE vocabulary without every byte (unknown characters are dropped)"
    normalize = _python_normalizer(spec.get("normalizer"))
    if normalize is False:
        normalize = backend.normalizer.normalize_str
    assert normalize is not True
    return TokenBound.of(tokens, [str(a["content"]) for a in added], normalize or None), ""
