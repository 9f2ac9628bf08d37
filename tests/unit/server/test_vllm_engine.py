"""slhf_server.vllm_engine's vLLM engine arguments from the settings (no engine is started)."""

from __future__ import annotations

import pytest

from slhf_server.settings import ServerSettings
from slhf_server.vllm_engine import _engine_args


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
