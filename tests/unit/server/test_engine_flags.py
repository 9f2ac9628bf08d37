"""vLLM's own engine flags on ``slhf serve`` (server/slhf_server/engine_flags.py): parsed by vLLM's
parser, routed to the slhf setting of the same meaning, to every engine, or refused."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from slhf.cli import main, serve_overrides
from slhf_server.engine_flags import EngineFlagError, check_engine_args, route, split_serve_argv
from slhf_server.settings import ServerSettings
from slhf_server.vllm_engine import _engine_args


def overrides(argv: list[str]) -> dict[str, Any]:
    """What ``slhf serve ARGV`` would set, without serving."""
    fields, rest = split_serve_argv(argv)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    from slhf.cli import _serve_parser

    _serve_parser(sub)
    args = parser.parse_args(["serve", *rest])
    args.engine_fields = fields
    return serve_overrides(args)


def test_vllm_flags_reach_the_engine_and_slhf_flags_the_settings() -> None:
    got = overrides(
        [
            "my/model",
            "--kv-cache-dtype", "fp8",
            "--max-num-batched-tokens", "2048",
            "--quantization", "fp8",
            "--data-parallel-size", "2",
            "--otlp-traces-endpoint", "http://127.0.0.1:4318",
            "--max-num-seqs", "7",
            "--max-model-len", "4096",
            "--block-size", "32",
            "--port", "8123",
            "--served-model-name", "mine",
        ]
    )  # fmt: skip
    assert got["engine_args"] == {
        "kv_cache_dtype": "fp8",
        "max_num_batched_tokens": 2048,
        "quantization": "fp8",
        "data_parallel_size": 2,
        "otlp_traces_endpoint": "http://127.0.0.1:4318",
    }
    assert got["model"] == "my/model" and got["port"] == 8123
    assert (got["max_num_seqs"], got["max_model_len"], got["kv_block_size"]) == (7, 4096, 32)
    assert got["served_model_name"] == "mine"
    settings = ServerSettings(**got)
    engine = _engine_args("m", settings, max_model_len=4096, enable_lora=False, memory_share=1.0)
    assert (engine.kv_cache_dtype, engine.max_num_batched_tokens) == ("fp8", 2048)
    assert (engine.max_num_seqs, engine.block_size, engine.data_parallel_size) == (7, 32, 2)


def test_a_flag_the_topology_decides_is_refused_with_what_to_use() -> None:
    with pytest.raises(EngineFlagError, match="--enable-lora cannot be set: topology 'lora'"):
        route({"enable_lora": True})
    with pytest.raises(EngineFlagError, match="--tokenizer cannot be set"):
        overrides(["--tokenizer", "other"])


def test_bad_values_and_unknown_flags_exit_2_with_the_parsers_messages(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as bad:
        split_serve_argv(["--max-num-seqs", "many"])
    assert bad.value.code == 2 and "max-num-seqs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as unknown:
        main(["serve", "--no-such-flag"])
    assert unknown.value.code == 2 and "--no-such-flag" in capsys.readouterr().err


def test_help_engine_prints_vllms_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help-engine"]) == 0
    out = capsys.readouterr().out
    assert "--kv-cache-dtype" in out and "--max-num-batched-tokens" in out


def test_slhf_engine_args_are_checked_when_the_engine_starts() -> None:
    check_engine_args({"kv_cache_dtype": "fp8"})
    with pytest.raises(EngineFlagError, match="set SLHF_MAX_MODEL_LEN"):
        check_engine_args({"max_model_len": 5})
    with pytest.raises(EngineFlagError, match="not one of vLLM's"):
        check_engine_args({"kv_cache_dtyp": "fp8"})
    settings = ServerSettings(engine_args={"max_loras": 4})
    with pytest.raises(EngineFlagError, match="max_loras"):
        _engine_args("m", settings, max_model_len=512, enable_lora=False, memory_share=1.0)


def test_env_engine_args_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLHF_ENGINE_ARGS", '{"max_num_batched_tokens": 4096}')
    assert ServerSettings().engine_args == {"max_num_batched_tokens": 4096}


def test_chunked_prefill_is_refused_on_vllms_cpu_build() -> None:
    from slhf_models.serving import vllm_cpu

    settings = ServerSettings(engine_args={"enable_chunked_prefill": True})
    if not vllm_cpu.on_cpu():
        pytest.skip("a GPU build of vLLM: chunked prefill is allowed")
    refused = "enable-chunked-prefill is refused on vLLM's CPU build"
    with pytest.raises(EngineFlagError, match=refused):
        _engine_args("m", settings, max_model_len=512, enable_lora=False, memory_share=1.0)


def test_engine_flags_are_parsed_only_when_given_and_under_json_logs_after_the_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Importing vLLM prints (e.g. Triton's notice): with JSON logs the log pipe must be in
    first, and without engine flags vLLM is not imported before ``serve`` at all."""
    import slhf.cli as cli
    from slhf_server import log_pipe

    calls: list[str] = []
    monkeypatch.setattr(log_pipe, "install", lambda: calls.append("pipe"))
    monkeypatch.delenv("SLHF_LOG_FORMAT", raising=False)
    fields, argv = cli._engine_flags_first(["serve", "m", "--max-num-seqs", "3"])
    assert (fields, argv, calls) == ({"max_num_seqs": 3}, ["serve", "m"], [])
    cli._engine_flags_first(["serve", "--log-format", "json", "--max-num-seqs", "3"])
    assert calls == ["pipe"]
    monkeypatch.setenv("SLHF_LOG_FORMAT", "json")
    cli._engine_flags_first(["serve", "--max-num-seqs", "3"])
    assert calls == ["pipe", "pipe"]
