"""Follower prompts spliced from the Leader's sequence (``slhf_server.prompts``), and the usage
details
(cached prompt tokens, draft acceptance) on a fake engine with a per-token prefix cache."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from slhf_models.serving.templates import TemplateConfig, TemplateRenderer
from slhf_server.engine import DraftCounts, GenerationParams
from slhf_server.metrics import ServiceMetrics
from slhf_server.protocol import Usage
from slhf_server.refine import RefineJob, Refiner
from tests.fakes import CharTokenizer, ScriptedEngine, numbered_script
from tests.unit.server.test_hardening import make_app

PARAMS = GenerationParams(max_tokens=16)
PROMPT = "What is gravity?"


class TrimmingTokenizer(CharTokenizer):
    """A chat template that strips each message, as Llama 3's does."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> str:
        trimmed = [{**m, "content": m["content"].strip()} for m in conversation]
        return super().apply_chat_template(trimmed, **kwargs)


def refiner(engine: ScriptedEngine, tokenizer: CharTokenizer | None = None) -> Refiner:
    r = TemplateRenderer(tokenizer or CharTokenizer())
    return Refiner(engine, {"leader": r, "follower": r})


def job(rounds: int, **kw: Any) -> RefineJob:
    return RefineJob("req", kw.pop("prompt", PROMPT), rounds, PARAMS, PARAMS, **kw)


@pytest.mark.parametrize("layout", ["chat", "plain"])
def test_follower_tail_splices_to_exactly_the_rendered_prompt(layout: str) -> None:
    r = TemplateRenderer(CharTokenizer(), TemplateConfig(layout=layout))  # type: ignore[arg-type]
    tail, why = r.follower_tail()
    assert tail is not None and why == ""
    lead = r.encode_role("leader", PROMPT, None)
    answer = " An answer,\nwith lines. "
    assert lead + CharTokenizer().encode(answer) + tail == r.encode_role("follower", PROMPT, answer)


def test_a_template_that_rewrites_the_answer_is_not_spliced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tail, why = TemplateRenderer(TrimmingTokenizer()).follower_tail()
    assert tail is None and "does not begin with T_L(x) + y" in why
    with caplog.at_level(logging.INFO, "slhf.refine"):
        ref = refiner(ScriptedEngine(numbered_script, prefix_cache=True), TrimmingTokenizer())
    assert ref.prompts.follower_tail is None
    assert "rendered, not spliced" in caplog.text


@pytest.mark.parametrize("stream", [False, True])
def test_round_one_is_served_the_whole_leader_sequence_from_the_cache(stream: bool) -> None:
    engine = ScriptedEngine(numbered_script, prefix_cache=True)
    ref = refiner(engine)
    sink = (lambda i, t: None) if stream else None
    out = asyncio.run(ref.refine(job(2), lambda i: sink))
    leader_prompt = engine.calls[0].prompt
    render = ref.renderers["follower"].render_follower
    # the spliced prompts are the rendered ones
    assert engine.calls[1].prompt == render(PROMPT, "answer 0")
    assert engine.calls[2].prompt == render(PROMPT, "answer 1")
    details = [r.usage.prompt_tokens_details for r in out.rounds]
    assert details[0] is not None and details[1] is not None
    # round 1 finds the Leader's prompt + answer; round 2 finds the Leader's prompt and the
    # characters "answer " its answer shares with the Leader's (the fake caches per token)
    assert details[0].cached_tokens == len(leader_prompt) + len("answer 0")
    assert details[1].cached_tokens == len(leader_prompt) + len("answer ")
    total = out.usage.prompt_tokens_details
    assert total is not None
    assert total.cached_tokens == sum(d.cached_tokens for d in details)  # the Leader had 0


def test_a_given_answer_is_rendered_and_later_rounds_still_match_the_rendering() -> None:
    engine = ScriptedEngine(numbered_script, prefix_cache=True)
    ref = refiner(engine)
    asyncio.run(ref.refine(job(2, given_answer="my draft")))
    render = ref.renderers["follower"].render_follower
    assert [c.prompt for c in engine.calls] == [
        render(PROMPT, "my draft"),
        render(PROMPT, "answer 1"),
    ]


def test_two_tokenizers_are_never_spliced() -> None:
    engine = ScriptedEngine(numbered_script, prefix_cache=True)
    ref = Refiner(
        engine,
        {
            "leader": TemplateRenderer(CharTokenizer()),
            "follower": TemplateRenderer(CharTokenizer()),
        },
    )
    assert ref.prompts.follower_tail is None


def test_usage_without_engine_details_has_no_detail_fields() -> None:
    out = asyncio.run(refiner(ScriptedEngine(numbered_script)).refine(job(1)))
    assert set(out.usage.model_dump()) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert set(out.rounds[0].usage.model_dump()) == set(out.usage.model_dump())


def test_draft_acceptance_is_in_the_usage_of_each_round_and_the_metrics() -> None:
    engine = ScriptedEngine(numbered_script, prefix_cache=True, drafts=DraftCounts(3, 5))
    out = asyncio.run(refiner(engine).refine(job(2, stop_when_unchanged=False)))
    per_round = [r.usage.model_dump()["completion_tokens_details"] for r in out.rounds]
    assert per_round == [{"accepted_prediction_tokens": 3, "rejected_prediction_tokens": 2}] * 2
    total = out.usage.completion_tokens_details
    assert total is not None and total.accepted_prediction_tokens == 9  # Leader + 2 rounds
    metrics = ServiceMetrics()
    metrics.observe_outcome(out)
    sample = metrics.registry.get_sample_value
    labels = {"role": "follower", "round": "1"}
    assert sample("slhf_draft_tokens_total", {**labels, "outcome": "accepted"}) == 3
    assert sample("slhf_draft_tokens_total", {**labels, "outcome": "rejected"}) == 2
    cached = out.rounds[0].usage.prompt_tokens_details
    assert cached is not None
    assert sample("slhf_round_prompt_tokens_total", {**labels, "cached": "yes"}) == (
        cached.cached_tokens
    )
    assert sample("slhf_round_prompt_tokens_total", {**labels, "cached": "no"}) == (
        out.rounds[0].usage.prompt_tokens - cached.cached_tokens
    )


def test_usage_adds_details_where_either_side_reports_them() -> None:
    a = Usage(prompt_tokens=4, total_tokens=4, prompt_tokens_details={"cached_tokens": 3})
    b = Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3)
    assert (a + b).model_dump() == {
        "prompt_tokens": 6,
        "completion_tokens": 1,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


# -- off the event loop, and refused before tokenizing -------------------------------------------
class DemoTokenizerEngine(ScriptedEngine):
    """A scripted engine with the shipped demo model's real tokenizer (2,048-token context)."""

    def tokenizer(self, role: Any) -> Any:  # type: ignore[override]
        return demo_tokenizer()


@functools.cache
def demo_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from slhf_models.serving.loading import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


BIG = 4 * 1024 * 1024 - 1024  # just under SLHF_MAX_BODY_BYTES with the JSON around it


def test_four_huge_prompts_are_refused_at_once_and_health_stays_fast() -> None:
    """Four 4 MiB prompts at once (tokenizing each took 3-5 s on the event loop): each is the
    usual 400, from its length alone, while /health answers throughout."""
    app = make_app(DemoTokenizerEngine(numbered_script, context=2048))
    with TestClient(app) as client:

        def huge(i: int) -> tuple[int, dict[str, Any], float]:
            start = time.perf_counter()
            r = client.post("/v1/refine", json={"prompt": f"{i} " + "word " * (BIG // 5)})
            return r.status_code, r.json(), time.perf_counter() - start

        health: list[float] = []
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(huge, i) for i in range(4)]
            while not all(f.done() for f in futures):
                start = time.perf_counter()
                assert client.get("/health").status_code == 200
                health.append(time.perf_counter() - start)
            results = [f.result() for f in futures]
        for status, body, seconds in results:
            assert status == 400 and body["error"]["code"] == "context_length_exceeded"
            assert "Leader prompt has at least" in body["error"]["message"]
            assert "max_model_len is 2,048" in body["error"]["message"]
            assert seconds < 3.0  # tokenizing one took 3-5 s; four in a row, 15 s
        assert max(health, default=0.0) < 1.0  # it took up to 9.8 s (a busy machine: margin)
        lag = client.get("/metrics").text
        assert "slhf_event_loop_lag_seconds " in lag


def test_a_prompt_within_the_bound_that_does_not_fit_is_measured_by_tokenizing() -> None:
    """Short enough to pass the bound, too long once tokenized: the exact count (2 chars a
    token here), tokenized in the worker thread."""
    app = make_app(DemoTokenizerEngine(numbered_script, context=2048))
    with TestClient(app) as client:
        r = client.post("/v1/refine", json={"prompt": "ab " * 2000})
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert "at least" not in message and "max_model_len is 2,048" in message
        ok = client.post("/v1/refine", json={"prompt": "Is 2 + 2 = 4?", "rounds": 1})
        assert ok.status_code == 200, ok.text


def test_prompts_are_tokenized_in_the_tokenizer_thread_never_on_the_loop() -> None:
    seen: list[str] = []

    class Recording(CharTokenizer):
        def encode(self, text: str, **kwargs: Any) -> list[int]:
            seen.append(threading.current_thread().name)
            return super().encode(text, **kwargs)

    ref = refiner(ScriptedEngine(numbered_script), Recording())
    seen.clear()  # the start-up splice check runs on the caller's thread
    asyncio.run(ref.refine(job(2, given_answer="draft")))
    assert seen and all(name.startswith("slhf-tokenizer-") for name in seen)


def test_a_follower_prompt_that_outgrows_the_context_stops_the_loop() -> None:
    engine = ScriptedEngine(lambda call: "x" * 300, context=400)
    out = asyncio.run(refiner(engine).refine(job(3, stop_when_unchanged=False)))
    assert out.stopped_reason == "context_length"
