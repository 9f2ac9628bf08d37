"""Structured outputs, log-probabilities and logit bias on vLLM (``slhf_server.vllm_engine``).

- ``structured``: an ``OutputFormat`` as vLLM's ``StructuredOutputsParams`` (vLLM picks the
  backend, xgrammar first; the engine compiles the grammar for the tokenizer off the event loop).
  One exception: xgrammar (0.2) writes a string with ``maxLength`` as characters that admit the
  control characters U+0000..U+001F, which JSON forbids unescaped (strict parsers, pydantic's and
  the ``openai`` SDK's ``parse`` included, refuse such an answer). Where xgrammar's grammar for a
  schema has that rule, the grammar is sent instead, with JSON's own rule for string characters.
- ``SchemaCheck``: vLLM turns a JSON schema into a grammar once more when a request is added, on
  the caller's thread -- here the event loop. Before that, each distinct schema is turned into a
  grammar on a worker thread (xgrammar releases the GIL) within ``budget_s``
  (SLHF_SCHEMA_COMPILE_TIMEOUT_S, 0.2 s by default), counted from when a worker takes it: a
  schema that takes longer is refused (``ValueError``, a 400), so vLLM's own pass on the loop
  stays as short as that. Accepted schemas are remembered.
  docs/wire.md, "Structured outputs", gives the bounds that come first (size, depth).
- ``token_logprobs``: vLLM's per-position logprob dicts as ``TokenLogprob``s.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# xgrammar: vLLM's default structured-output backend, imported with this module rather than by
# the first schema check's worker thread (an import holds the GIL: the event loop would wait)
import xgrammar as xgr
from vllm.sampling_params import StructuredOutputsParams

from slhf_server.engine import OutputFormat, TokenLogprob
from slhf_server.settings import SCHEMA_COMPILE_TIMEOUT_S

SCHEMAS_REMEMBERED = 1024
SCHEMA_WORKERS = 4
"""Worker threads building grammars: a slow schema holds one, not the others' checks."""


def structured(
    fmt: OutputFormat | None, grammar: str | None = None
) -> StructuredOutputsParams | None:
    """vLLM's constraint for ``fmt``; ``grammar``: the EBNF ``SchemaCheck.check`` gave for it."""
    if fmt is None:
        return None
    if fmt.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if grammar is not None:
        return StructuredOutputsParams(grammar=grammar)
    return StructuredOutputsParams(json=fmt.schema)


BOUNDED_STRING_CHAR = '[^\\"\\\\\\r\\n]'
"""xgrammar's character rule inside a length-bounded JSON string (it lets U+0000..U+001F in)."""
JSON_STRING_CHAR = '[^\\"\\\\\\0-\\x1f]'
"""JSON's: anything but a quote, a backslash and U+0000..U+001F (escapes are not offered)."""


def _grammar(schema: str) -> str | None:
    """xgrammar's grammar for ``schema`` (EBNF) when it needs JSON's string-character rule
    restored; None when it does not, or when xgrammar cannot build one (vLLM then decides:
    another backend, or a 400)."""
    try:
        ebnf = str(xgr.Grammar.from_json_schema(json.loads(schema)))
    except Exception:
        return None
    if BOUNDED_STRING_CHAR not in ebnf:
        return None
    return ebnf.replace(BOUNDED_STRING_CHAR, JSON_STRING_CHAR)


class SchemaCheck:
    """Refuses schemas too slow to become a grammar, before vLLM builds one on the loop:
    ``budget_s`` is the most seconds a schema may take (measured on a worker thread)."""

    def __init__(self, budget_s: float = SCHEMA_COMPILE_TIMEOUT_S) -> None:
        self.budget_s = budget_s
        self._pool = ThreadPoolExecutor(SCHEMA_WORKERS, thread_name_prefix="slhf-schema")
        self._ok: OrderedDict[str, str | None] = OrderedDict()

    async def check(self, fmt: OutputFormat | None) -> str | None:
        """Refuse ``fmt``'s schema when it is too slow; else the grammar to send for it, if any
        (``structured``)."""
        if fmt is None or fmt.schema is None:
            return None
        if fmt.schema in self._ok:
            self._ok.move_to_end(fmt.schema)
            return self._ok[fmt.schema]
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def begun() -> None:
            if not started.done():
                started.set_result(None)

        def run(schema: str) -> str | None:
            loop.call_soon_threadsafe(begun)
            return _grammar(schema)

        work: asyncio.Future[str | None] = loop.run_in_executor(self._pool, run, fmt.schema)
        await asyncio.shield(started)  # the budget counts from when a worker takes it
        try:
            grammar = await asyncio.wait_for(asyncio.shield(work), self.budget_s)
        except TimeoutError:
            raise ValueError(
                f"the JSON schema takes more than {self.budget_s:g} s to turn into a grammar "
                "(SLHF_SCHEMA_COMPILE_TIMEOUT_S); simplify it (fewer nested or counted "
                "repetitions in patterns)"
            ) from None
        self._ok[fmt.schema] = grammar
        if len(self._ok) > SCHEMAS_REMEMBERED:
            self._ok.popitem(last=False)
        return grammar

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


LOWEST_LOGPROB = -9999.0
"""A log-probability of -inf is sent as this (JSON has no infinity), as vLLM's server does."""


def _finite(x: float) -> float:
    return max(float(x), LOWEST_LOGPROB)


def token_logprobs(
    token_ids: Sequence[int], positions: Any, top: int, keep: int
) -> tuple[TokenLogprob, ...] | None:
    """The first ``keep`` generated tokens with their log-probabilities and ``top``
    alternatives (vLLM's positions: token id -> ``Logprob``, the sampled one included)."""
    if positions is None:
        return None
    out = []
    for tid, pos in list(zip(token_ids, positions, strict=False))[:keep]:
        chosen = pos.get(tid) if pos is not None else None
        if chosen is None:
            continue
        ranked = sorted(
            (lp for lp in pos.values() if lp.rank is not None and lp.rank <= top),
            key=lambda lp: lp.rank,
        )
        out.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=_finite(chosen.logprob),
                top=tuple((lp.decoded_token or "", _finite(lp.logprob)) for lp in ranked),
            )
        )
    return tuple(out)
