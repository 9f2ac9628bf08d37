"""vLLM's structured outputs, logprobs and the schema check (``slhf_server.vllm_formats``),
without an engine."""

from __future__ import annotations

import asyncio
import json

import pytest
from vllm.logprobs import Logprob

from slhf_server.engine import OutputFormat, TokenLogprob
from slhf_server.settings import SCHEMA_COMPILE_TIMEOUT_S
from slhf_server.vllm_formats import SchemaCheck, structured, token_logprobs

SLOW = OutputFormat("json_schema", '{"type":"string","pattern":"^((.{1,1000}){1,1000}){1,1000}$"}')
"""A schema whose pattern's counted repetitions make a large grammar (slow to build)."""


def test_formats_become_vllms_structured_outputs() -> None:
    assert structured(None) is None
    assert structured(OutputFormat("json_object")).json_object is True  # type: ignore[union-attr]
    assert (
        structured(OutputFormat("json_schema", '{"type":"integer"}')).json == '{"type":"integer"}'
    )  # type: ignore[union-attr]


def test_token_logprobs_keep_the_sampled_token_and_the_top_ranked() -> None:
    positions = [
        {5: Logprob(-0.1, 1, "Hi"), 6: Logprob(-2.5, 2, "Ho"), 7: Logprob(-3.0, 3, "He")},
        {9: Logprob(float("-inf"), 40, "!"), 6: Logprob(-0.2, 1, "?")},
        {2: Logprob(-0.01, 1, "</s>")},  # the final EOS: left out by ``keep``
    ]
    out = token_logprobs([5, 9, 2], positions, top=2, keep=2)
    assert out == (
        TokenLogprob("Hi", -0.1, (("Hi", -0.1), ("Ho", -2.5))),
        TokenLogprob("!", -9999.0, (("?", -0.2),)),
    )
    assert token_logprobs([5], None, top=2, keep=1) is None


def test_schema_check_does_not_run_on_the_event_loop() -> None:
    """The real check (``slhf_server.vllm_formats.SchemaCheck``) builds the grammar on its own
    thread: the loop keeps running meanwhile; a slow one is refused."""

    async def go() -> tuple[float, str]:
        check = SchemaCheck()
        slow = SLOW
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            await check.check(slow)
            outcome = "accepted"
        except ValueError as e:
            outcome = str(e)
        ticker.cancel()
        await check.check(OutputFormat("json_schema", '{"type":"integer"}'))
        check.close()
        return ticks, outcome

    ticks, outcome = asyncio.run(go())
    assert ticks >= 5, "the event loop stalled while the schema was checked"
    assert outcome == "accepted" or f"more than {SCHEMA_COMPILE_TIMEOUT_S:g} s" in outcome


def test_the_schema_budget_is_the_checks_own() -> None:
    """SLHF_SCHEMA_COMPILE_TIMEOUT_S reaches the check as ``budget_s``: a budget far shorter
    than the slow schema takes refuses it, naming the budget and the setting."""

    REFUSED = r"more than 0\.001 s to turn into a grammar \(SLHF_SCHEMA_COMPILE_TIMEOUT_S\)"

    async def go() -> None:
        check = SchemaCheck(budget_s=0.001)
        try:
            with pytest.raises(ValueError, match=REFUSED):
                await check.check(SLOW)
        finally:
            check.close()

    asyncio.run(go())
    default = SchemaCheck()
    default.close()
    assert default.budget_s == SCHEMA_COMPILE_TIMEOUT_S == 0.2


def _matches(grammar: object, text: str) -> bool:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from slhf_models.serving.loading import SHIPPED_MODEL_DIR

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR))
    compiled = xgr.GrammarCompiler(info).compile_grammar(grammar)  # type: ignore[arg-type]
    matcher = xgr.GrammarMatcher(compiled)
    return bool(matcher.accept_string(text))


def test_a_length_bounded_string_admits_no_control_character() -> None:
    """xgrammar's own grammar for ``maxLength`` lets U+001A into the string (an answer that
    strict JSON parsers refuse, seen from the tiny model); the grammar sent instead does not."""
    import xgrammar as xgr

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "tag": {"type": "string", "maxLength": 3}},
        "required": ["ok", "tag"],
    }
    text = json.dumps(schema)
    bad, good = '{"ok": false, "tag": "\x1a!"}', '{"ok": true, "tag": "ab"}'
    assert _matches(xgr.Grammar.from_json_schema(text), bad)  # xgrammar's own: let through
    grammar = asyncio.run(SchemaCheck().check(OutputFormat("json_schema", text)))
    assert grammar is not None
    sent = structured(OutputFormat("json_schema", text), grammar)
    assert sent is not None and sent.grammar == grammar and sent.json is None
    ebnf = xgr.Grammar.from_ebnf(grammar)
    assert not _matches(ebnf, bad) and _matches(ebnf, good)
    # a schema whose strings are unbounded keeps xgrammar's JSON rules: the schema goes as is
    plain = json.dumps({"type": "object", "properties": {"tag": {"type": "string"}}})
    assert asyncio.run(SchemaCheck().check(OutputFormat("json_schema", plain))) is None
