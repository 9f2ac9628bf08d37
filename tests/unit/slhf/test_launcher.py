"""The launcher of ``slhf serve`` (``slhf.launcher``) without vLLM: fake server commands
(Python's own ``http.server``, a sleeper, a process that ignores SIGTERM) and the real command
failing fast on a model folder that does not exist."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from slhf.launcher import (
    LOOPBACK,
    ServerProcess,
    ServerStartError,
    clean_env,
    free_port,
    serve_command,
    serve_env,
)

PY = sys.executable


def gone(pid: int) -> bool:
    """True when ``pid`` is no running process (none, or a zombie no one has reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def static_server(tmp_path: Path) -> tuple[list[str], str]:
    """A server whose ``/ready`` answers 200: ``http.server`` over a folder holding ``ready``."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "ready").write_text("ok")
    port = free_port()
    command = [PY, "-m", "http.server", str(port), "--bind", LOOPBACK, "--directory", str(root)]
    return command, f"http://{LOOPBACK}:{port}"


def test_a_ready_server_is_reachable_and_stops_on_sigterm(tmp_path: Path) -> None:
    command, url = static_server(tmp_path)
    log = tmp_path / "logs" / "static.log"  # a missing folder is made
    with ServerProcess.spawn(command, url=url, log=log, timeout_s=30) as server:
        assert server.url == url and server.log == log and server.proc.poll() is None
        assert 0 < server.startup_s < 30
        assert httpx.get(url + "/ready", timeout=5).text == "ok"
        pid = server.pid
    assert server.proc.returncode == -signal.SIGTERM and gone(pid)
    assert "GET /ready" in log.read_text()  # the child's output went to the log
    assert server.stop() == -signal.SIGTERM  # stopping twice is harmless


def test_a_server_that_never_gets_ready_fails_at_the_deadline_with_its_log(
    tmp_path: Path,
) -> None:
    script = "import os, time; print('booting pid', os.getpid(), flush=True); time.sleep(600)"
    log = tmp_path / "never.log"
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        ServerProcess.spawn([PY, "-c", script], url=f"http://{LOOPBACK}:{free_port()}",
                            log=log, timeout_s=2.0)  # fmt: skip
    took = time.monotonic() - t0
    assert 2.0 <= took < 10.0
    message = str(err.value)
    assert "was not ready after 2 s (/ready: ConnectError)" in message and str(log) in message
    assert "booting pid" in message  # the log's tail
    assert err.value.returncode is None and err.value.log == log
    pid = int(log.read_text().split()[-1])
    assert gone(pid)  # stopped before the error was raised


def test_a_server_that_answers_but_not_200_is_not_ready(tmp_path: Path) -> None:
    command, url = static_server(tmp_path)
    with pytest.raises(ServerStartError) as err:  # no file named "health": a 404
        ServerProcess.spawn(command, url=url, log=tmp_path / "404.log", ready_path="/health",
                            timeout_s=3.0)  # fmt: skip
    assert "was not ready after 3 s (/health: HTTP 404)" in str(err.value)
    assert "GET /health" in str(err.value)  # http.server's log of the checks: the tail


def test_a_server_that_exits_early_fails_at_once_with_its_status_and_log(tmp_path: Path) -> None:
    script = "import sys; print('cannot load the model', file=sys.stderr); sys.exit(3)"
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        ServerProcess.spawn([PY, "-c", script], url=f"http://{LOOPBACK}:{free_port()}",
                            log=tmp_path / "exits.log", timeout_s=60)  # fmt: skip
    assert time.monotonic() - t0 < 10.0  # not the 60 s deadline
    assert "exited with 3 before it was ready" in str(err.value)
    assert "cannot load the model" in str(err.value)  # stderr is in the log too
    assert err.value.returncode == 3


def test_a_server_that_ignores_sigterm_is_killed_with_its_process_group(tmp_path: Path) -> None:
    command, url = static_server(tmp_path)
    # ignores SIGTERM and leaves a child in its group (as vLLM's engine process), then serves
    script = (
        "import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print('child', child.pid, flush=True); "
        "import runpy; runpy.run_module('http.server', run_name='__main__')"
    )
    server = ServerProcess.spawn([PY, "-c", script, *command[3:]], url=url,
                                 log=tmp_path / "stubborn.log", timeout_s=30)  # fmt: skip
    child = int(next(x for x in server.log.read_text().splitlines() if x.startswith("child"))[6:])
    t0 = time.monotonic()
    assert server.stop(timeout_s=1.0) == -signal.SIGKILL
    assert 1.0 <= time.monotonic() - t0 < 10.0
    deadline = time.monotonic() + 5.0  # SIGKILL reached the whole group; its end is not instant
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(child)


def test_an_unreachable_log_tail_is_empty_not_an_error(tmp_path: Path) -> None:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    server = ServerProcess(proc, "http://127.0.0.1:1/", tmp_path / "missing.log")
    assert server.url == "http://127.0.0.1:1" and server.tail() == ""
    assert server.stop() == 0


def test_slhf_serve_on_a_missing_model_fails_fast_with_the_reason(tmp_path: Path) -> None:
    # the real command: it fails before it would import vLLM
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        ServerProcess.start(tmp_path / "serve.log", SLHF_MODEL="/nonexistent/model", timeout_s=60)
    assert time.monotonic() - t0 < 30.0
    assert "no such model folder" in str(err.value) and err.value.returncode not in (None, 0)
    assert "-m slhf.cli serve" in str(err.value)


def test_start_without_a_log_writes_one_in_the_temporary_directory() -> None:
    with pytest.raises(ServerStartError) as err:
        ServerProcess.start(SLHF_MODEL="/nonexistent/model", timeout_s=60)
    try:
        assert err.value.log.name.startswith("slhf-serve-") and err.value.log.exists()
        assert "no such model folder" in err.value.log.read_text()
    finally:
        err.value.log.unlink()


def test_the_environment_names_exactly_the_given_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLHF_API_KEYS", "from-the-shell")
    monkeypatch.setenv("SLHF_PORT", "8000")
    monkeypatch.setenv("KEEP_ME", "1")
    env = serve_env(1234, SLHF_MODEL="m", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert env["SLHF_HOST"] == LOOPBACK and env["SLHF_PORT"] == "1234"
    assert env["SLHF_MODEL"] == "m" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "SLHF_API_KEYS" not in env and env["KEEP_ME"] == "1"
    assert clean_env(SLHF_X="y") == {**clean_env(), "SLHF_X": "y"}
    # a given base environment is taken as it is (SLHF_* kept); host and port are the launcher's
    kept = serve_env(99, {"SLHF_LOG_LEVEL": "warning", "SLHF_PORT": "1"})
    assert kept == {"SLHF_LOG_LEVEL": "warning", "SLHF_HOST": LOOPBACK, "SLHF_PORT": "99"}


def test_the_command_is_slhf_serve_under_this_interpreter() -> None:
    assert serve_command(["--model", "m"]) == [PY, "-m", "slhf.cli", "serve", "--model", "m"]


def test_the_launcher_imports_nothing_heavy() -> None:
    code = (
        "import sys, slhf.launcher; "
        "bad = [m for m in ('vllm', 'torch', 'transformers', 'fastapi', 'slhf_server.app') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
