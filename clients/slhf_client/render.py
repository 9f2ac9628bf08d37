"""Terminal rendering for ``slhf refine``: headers, and word-level diffs between rounds.

Without colour a diff reads like ``git diff --word-diff``: ``[-removed-]{+added+}``. With
colour (a TTY, and ``NO_COLOR`` unset) removed words are red and struck through, added words
green.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import TextIO

_RED_STRIKE = "\x1b[31;9m"
_GREEN = "\x1b[32m"
_BOLD = "\x1b[1m"
_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


def use_color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


@dataclass(frozen=True)
class WordDiff:
    text: str
    """The new text with removed and added words marked."""
    added: int
    removed: int
    hunks: list[str]
    """Each changed span on its own (``[-old-]{+new+}``), for a compact summary."""

    @property
    def unchanged(self) -> bool:
        return self.added == 0 and self.removed == 0


def _tokens(text: str) -> list[str]:
    """Words with their trailing whitespace, so the rendered text keeps its line breaks."""
    return re.findall(r"\S+\s*", text)


def word_diff(old: str, new: str, color: bool = False) -> WordDiff:
    a, b = _tokens(old), _tokens(new)
    matcher = difflib.SequenceMatcher(a=[t.strip() for t in a], b=[t.strip() for t in b])
    parts: list[str] = []
    hunks: list[str] = []
    added = removed = 0
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            parts.append("".join(b[j1:j2]))
            continue
        hunk = ""
        if i2 > i1:
            removed += i2 - i1
            hunk += _mark("".join(a[i1:i2]), "-", color)
        if j2 > j1:
            added += j2 - j1
            hunk += _mark("".join(b[j1:j2]), "+", color)
        parts.append(hunk)
        hunks.append(hunk.strip())
    return WordDiff("".join(parts), added, removed, hunks)


def _mark(words: str, sign: str, color: bool) -> str:
    body, tail = words.rstrip(), words[len(words.rstrip()) :]
    if color:
        return f"{_RED_STRIKE if sign == '-' else _GREEN}{body}{_RESET}{tail or ' '}"
    return f"[{sign}{body}{sign}]{tail or ' '}" if sign == "-" else f"{{+{body}+}}{tail or ' '}"


def header(text: str, color: bool) -> str:
    return f"{_BOLD}{text}{_RESET}" if color else f"== {text} =="


def dim(text: str, color: bool) -> str:
    return f"{_DIM}{text}{_RESET}" if color else text


def change_summary(diff: WordDiff, color: bool, max_hunks: int = 6) -> str:
    """One line: ``+3 −2 words: [-a-]{+b+} …`` (or ``unchanged``)."""
    if diff.unchanged:
        return dim("unchanged from the previous round", color)
    shown = " ".join(diff.hunks[:max_hunks])
    more = f" … ({len(diff.hunks) - max_hunks} more)" if len(diff.hunks) > max_hunks else ""
    return f"{dim(f'+{diff.added} -{diff.removed} words:', color)} {shown}{more}"
