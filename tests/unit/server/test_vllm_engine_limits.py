"""The wire bounds are vLLM's own (one bound, not two), and ``slhf_server.vllm_engine`` maps vLLM's
request
errors onto the ``Engine`` protocol: rejections stay plain exceptions (400s), the rest are
``EngineError`` (503s). No engine is started."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from slhf_server.engine import MAX_TEMPERATURE, MAX_TOP_K, EngineError
from slhf_server.errors import REQUEST_REJECTIONS
from slhf_server.vllm_engine import _server_error


def test_max_temperature_is_vllms() -> None:
    SamplingParams(temperature=MAX_TEMPERATURE)
    with pytest.raises(VLLMValidationError, match="temperature"):
        SamplingParams(temperature=MAX_TEMPERATURE + 1e-6)


def test_max_top_k_is_accepted_by_vllm() -> None:
    assert SamplingParams(top_k=MAX_TOP_K).top_k == MAX_TOP_K
    assert MAX_TOP_K == 2**31 - 1  # the sampler's int32 top-k tensor


def _wrapped(cause: Exception) -> EngineGenerateError:
    try:
        raise EngineGenerateError() from cause
    except EngineGenerateError as e:
        return e


@pytest.mark.parametrize(
    "exc",
    [
        VLLMValidationError("temperature must be in [0, 2], got 3.0."),
        _wrapped(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")),
        _wrapped(OverflowError("can't serialize an int of 2**64")),
        ValueError("prompt too long"),
    ],
)
def test_vllm_request_errors_become_rejections(exc: Exception) -> None:
    mapped = _server_error("leader", exc)
    assert isinstance(mapped, REQUEST_REJECTIONS) and not isinstance(mapped, EngineError)


@pytest.mark.parametrize(
    "exc", [EngineDeadError(), _wrapped(RuntimeError("CUDA error")), RuntimeError("boom")]
)
def test_other_vllm_failures_are_engine_errors(exc: Exception) -> None:
    assert isinstance(_server_error("follower", exc), EngineError)
