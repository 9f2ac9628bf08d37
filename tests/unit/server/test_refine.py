"""The refinement loop against a scripted fake engine."""

from __future__ import annotations

import asyncio

import pytest

from slhf_models.serving.templates import DEFAULT_FOLLOWER_INSTRUCTION, TemplateRenderer
from slhf_server.engine import GenerationParams
from slhf_server.errors import PromptTooLongError
from slhf_server.refine import RefineJob, Refiner, derive_seed
from tests.fakes import Call, CharTokenizer, ScriptedEngine, numbered_script

PARAMS = GenerationParams(max_tokens=16, temperature=0.9, top_k=50)


def make_refiner(engine: ScriptedEngine) -> Refiner:
    r = TemplateRenderer(CharTokenizer())
    return Refiner(engine, {"leader": r, "follower": r})


def job(rounds: int, **kw: object) -> RefineJob:
    base = dict(
        request_id="req", prompt="What is gravity?", rounds=rounds, leader=PARAMS, follower=PARAMS
    )
    base.update(kw)
    return RefineJob(**base)  # type: ignore[arg-type]


def run(refiner: Refiner, j: RefineJob):
    return asyncio.run(refiner.refine(j))


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_refine_runs_leader_then_exactly_k_follower_rounds(rounds: int) -> None:
    engine = ScriptedEngine(numbered_script)
    out = run(make_refiner(engine), job(rounds))
    assert [c.role for c in engine.calls] == ["leader"] + ["follower"] * rounds
    assert out.leader.text == "answer 0" and out.leader.source == "leader"
    assert [r.round for r in out.rounds] == list(range(1, rounds + 1))
    assert [r.text for r in out.rounds] == [f"answer {i}" for i in range(1, rounds + 1)]
    assert out.final == f"answer {rounds}"
    assert out.stopped_reason == "max_rounds"


def test_follower_sees_prompt_and_only_the_previous_answer() -> None:
    engine = ScriptedEngine(numbered_script)
    run(make_refiner(engine), job(3))
    leader_prompt = engine.calls[0].prompt
    assert leader_prompt == "<|user|>What is gravity?\n<|assistant|>"
    for i, call in enumerate(engine.calls[1:], start=1):
        assert call.prompt == (
            f"<|user|>What is gravity?\n<|assistant|>answer {i - 1}\n"
            f"<|user|>{DEFAULT_FOLLOWER_INSTRUCTION}\n<|assistant|>"
        )
        # no earlier answer leaks into the Follower's prompt
        assert all(f"answer {j}" not in call.prompt for j in range(i - 1))
        # the stable part comes first, so the prefix cache can reuse it across rounds
        assert call.prompt.startswith(leader_prompt.removesuffix("<|assistant|>"))


def test_refine_stops_when_unchanged() -> None:
    def script(call: Call) -> str:
        return "fixed point" if call.role == "follower" else "first try"

    engine = ScriptedEngine(script)
    out = run(make_refiner(engine), job(4))
    assert [r.text for r in out.rounds] == ["fixed point", "fixed point"]
    assert out.stopped_reason == "unchanged"
    assert len(engine.calls) == 3  # leader + 2 rounds, rounds 3 and 4 never started


def test_refine_keeps_going_when_early_stop_is_off() -> None:
    engine = ScriptedEngine(lambda c: "same")
    out = run(make_refiner(engine), job(3, stop_when_unchanged=False))
    assert len(out.rounds) == 3 and out.stopped_reason == "max_rounds"


def test_given_answer_skips_the_leader() -> None:
    engine = ScriptedEngine(numbered_script)
    out = run(make_refiner(engine), job(2, given_answer="an answer from elsewhere"))
    assert [c.role for c in engine.calls] == ["follower", "follower"]
    assert "an answer from elsewhere" in engine.calls[0].prompt
    assert out.leader.source == "given" and out.leader.text == "an answer from elsewhere"
    assert out.leader.usage.total_tokens == 0 and out.leader.finish_reason is None


def test_given_answer_with_zero_rounds_returns_it_unchanged() -> None:
    engine = ScriptedEngine(numbered_script)
    out = run(make_refiner(engine), job(0, given_answer="keep me"))
    assert engine.calls == [] and out.final == "keep me" and out.usage.total_tokens == 0


def test_per_round_seeds_are_derived_from_the_request_seed() -> None:
    seeded = GenerationParams(max_tokens=16, seed=1234)
    engine = ScriptedEngine(numbered_script)
    run(make_refiner(engine), job(3, leader=seeded, follower=seeded))
    seeds = [c.params.seed for c in engine.calls]
    assert seeds == [derive_seed(1234, i) for i in range(4)]
    assert len(set(seeds)) == 4  # rounds do not share a random stream
    # the same request seed gives the same seeds again; another seed gives others
    engine2 = ScriptedEngine(numbered_script)
    run(make_refiner(engine2), job(3, leader=seeded, follower=seeded))
    assert [c.params.seed for c in engine2.calls] == seeds
    assert derive_seed(1235, 1) != derive_seed(1234, 1)
    assert derive_seed(None, 3) is None


def test_unseeded_requests_stay_unseeded() -> None:
    engine = ScriptedEngine(numbered_script)
    run(make_refiner(engine), job(2))
    assert all(c.params.seed is None for c in engine.calls)


def test_usage_is_summed_over_leader_and_rounds() -> None:
    engine = ScriptedEngine(lambda c: "one two three" if c.role == "leader" else c.request_id)
    out = run(make_refiner(engine), job(2))
    parts = [out.leader.usage, *(r.usage for r in out.rounds)]
    # prompt tokens are the characters of each rendered prompt (CharTokenizer)
    assert [u.prompt_tokens for u in parts] == [len(c.prompt) for c in engine.calls]
    assert out.leader.usage.completion_tokens == 3
    assert out.usage.prompt_tokens == sum(u.prompt_tokens for u in parts)
    assert out.usage.completion_tokens == sum(u.completion_tokens for u in parts)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_round_results_carry_finish_reason_and_latency() -> None:
    engine = ScriptedEngine(lambda c: "w " * 40, delay=0.01)
    out = run(make_refiner(engine), job(1, stop_when_unchanged=False))
    assert out.leader.finish_reason == "length"
    assert out.rounds[0].finish_reason == "length"
    assert out.rounds[0].latency_ms >= 10.0


def test_too_long_prompt_is_rejected_before_any_generation() -> None:
    engine = ScriptedEngine(numbered_script, context=20)
    # "<|user|>What is gravity?\n<|assistant|>" is 8 + 16 + 1 + 13 = 38 characters
    with pytest.raises(PromptTooLongError, match=r"has 38 tokens; max_model_len is 20"):
        run(make_refiner(engine), job(2))
    assert engine.calls == []


def test_max_tokens_is_clamped_to_the_room_left_in_the_context() -> None:
    engine = ScriptedEngine(numbered_script, context=40)
    run(make_refiner(engine), job(0))
    assert engine.calls[0].params.max_tokens == 40 - len(engine.calls[0].prompt)


def test_follower_prompt_outgrowing_the_context_stops_with_context_length() -> None:
    # the Leader's answer fits, but the Follower prompt built from it does not
    engine = ScriptedEngine(lambda c: "x" * 30, context=100)
    out = run(make_refiner(engine), job(2))
    assert out.stopped_reason == "context_length"
    assert out.rounds == [] and out.final == "x" * 30


def test_cancellation_aborts_the_running_round_and_starts_no_more() -> None:
    engine = ScriptedEngine(numbered_script, delay=0.2)

    async def scenario() -> None:
        task = asyncio.create_task(make_refiner(engine).refine(job(3)))
        await asyncio.sleep(0.05)  # the Leader is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    assert [c.role for c in engine.calls] == ["leader"]
    assert engine.aborted == ["req-0"] and engine.num_running() == 0


def test_concurrent_refinements_overlap_in_the_engine() -> None:
    engine = ScriptedEngine(numbered_script, delay=0.05)
    refiner = make_refiner(engine)

    async def many() -> list:
        return await asyncio.gather(
            *(refiner.refine(job(2, request_id=f"r{i}")) for i in range(16))
        )

    outs = asyncio.run(many())
    assert all(o.final == "answer 2" for o in outs)
    assert engine.peak_running == 16  # nothing serialised the requests


def test_prompts_checked_before_admission_are_not_rendered_again_by_the_loop() -> None:
    engine = ScriptedEngine(numbered_script)
    refiner = make_refiner(engine)
    rendered: list[str] = []
    render = refiner.prompts.fitting_ids

    def counting(role, prompt, answer, param):  # type: ignore[no-untyped-def]
        if role == "leader":
            rendered.append(role)
        return render(role, prompt, answer, param)

    refiner.prompts.fitting_ids = counting  # type: ignore[method-assign]
    jobs = [job(1, request_id=f"req-{i}") for i in range(3)]  # n = 3 of one prompt

    async def main():  # type: ignore[no-untyped-def]
        await refiner.check_opening(jobs)
        assert rendered == ["leader"]  # the distinct prompt once
        return await asyncio.gather(*(refiner.refine(j) for j in jobs))

    outs = asyncio.run(main())
    assert rendered == ["leader"]  # the loop reused it
    assert [c.role for c in engine.calls] == ["leader"] * 3 + ["follower"] * 3
    assert all(o.final == "answer 1" for o in outs)
    # a job nobody checked renders its own prompt when its loop starts
    run(refiner, job(0))
    assert rendered == ["leader", "leader"]
