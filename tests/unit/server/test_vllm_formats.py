"""vLLM's structured outputs, logprobs and the schema check (``slhf_server.vllm_formats``),
without an engine."""

from __future__ import annotations

import asyncio

from vllm.logprobs import Logprob

from slhf_server.engine import OutputFormat, TokenLogprob
from slhf_server.vllm_formats import (
    SCHEMA_CHECK_BUDGET_S,
    SchemaCheck,
    structured,
    token_logprobs,
)


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
        slow = OutputFormat(
            "json_schema", '{"type":"string","pattern":"^((.{1,1000}){1,1000}){1,1000}$"}'
        )
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
    assert outcome == "accepted" or f"more than {SCHEMA_CHECK_BUDGET_S:g} s" in outcome
