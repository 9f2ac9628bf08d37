"""Real server processes with real vLLM CPU engines on tiny models, shared per session.

Each server is started once (lazily, by the first test that needs it) and stopped at the end of
the session. Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so an idle server
costs no CPU while other tests run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from slhf.models.tiny import FACTORY_VERSION, build_tiny_model
from tests.integration.fake_upstream import FakeUpstream

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLHF_")}
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(settings)
    return env


@dataclass
class ServerProcess:
    """A running ``slhf serve`` process on loopback."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    startup_s: float = 0.0

    @classmethod
    def start(cls, log: Path, **settings: str) -> ServerProcess:
        port = free_port()
        env = server_env(SLHF_HOST="127.0.0.1", SLHF_PORT=str(port), **settings)
        out = log.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "slhf.cli", "serve"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = cls(proc, f"http://127.0.0.1:{port}", log)
        server.wait_ready()
        return server

    def wait_ready(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slhf-cache")


@pytest.fixture(scope="session")
def lora_model(models_dir: Path) -> Path:
    """Same base weights as the default model (llama, seed 0), plus two adapters."""
    return build_tiny_model(models_dir / "tiny-llama-lora", family="llama", seed=0, adapters=True)


@pytest.fixture(scope="session")
def qwen_model(models_dir: Path) -> Path:
    return build_tiny_model(models_dir / "tiny-qwen2", family="qwen2", seed=1)


def _serve(
    tmp_path_factory: pytest.TempPathFactory, name: str, **settings: str
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    # a roomy admission bound: these servers test behaviour, test_hardening tests the bound
    server = ServerProcess.start(
        log,
        SLHF_MAX_ROUNDS="4",
        SLHF_MAX_MODEL_LEN="512",
        SLHF_MAX_INFLIGHT_GENERATIONS="1024",
        **settings,
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def random_model(cache_dir: Path) -> Path:
    """The random tiny llama (``slhf.models.tiny.random_model_dir``) in the session's cache: it
    rarely
    stops, so requests generate their full ``max_tokens`` (the shipped demo model does not)."""
    return build_tiny_model(cache_dir / f"tiny-llama-v{FACTORY_VERSION}", family="llama", seed=0)


@pytest.fixture(scope="session")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, random_model: Path
) -> Iterator[ServerProcess]:
    """Topology (a) on the random tiny llama: one model, both roles."""
    yield from _serve(
        tmp_path_factory, "shared", SLHF_CACHE_DIR=str(cache_dir), SLHF_MODEL=str(random_model)
    )


UPSTREAM_NAME = "tiny-qwen2-upstream"


@pytest.fixture(scope="session")
def upstream_server(
    tmp_path_factory: pytest.TempPathFactory, qwen_model: Path
) -> Iterator[ServerProcess]:
    """A second instance of our server on a Qwen2-family model: the upstream of ``lora_server``
    (it speaks /v1/chat/completions; ``<name>:leader`` gives its plain Leader answer)."""
    yield from _serve(
        tmp_path_factory,
        "upstream",
        SLHF_MODEL=str(qwen_model),
        SLHF_SERVED_MODEL_NAME=UPSTREAM_NAME,
    )


@pytest.fixture(scope="session")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, lora_model: Path, upstream_server: ServerProcess
) -> Iterator[ServerProcess]:
    """Topology (b): one base, Leader and Follower LoRA adapters in one engine.

    Also configured with ``upstream_server`` as its upstream (a Llama-family Follower refining
    Qwen2-family answers), so upstream mode is tested without one more server process.
    """
    yield from _serve(
        tmp_path_factory,
        "lora",
        SLHF_MODEL=str(lora_model),
        SLHF_UPSTREAM_BASE_URL=upstream_server.url + "/v1",
        SLHF_UPSTREAM_MODEL=UPSTREAM_NAME + ":leader",
        SLHF_UPSTREAM_TIMEOUT_S="60",
    )


@pytest.fixture(scope="session")
def separate_server(
    tmp_path_factory: pytest.TempPathFactory, qwen_model: Path, cache_dir: Path
) -> Iterator[ServerProcess]:
    """Topology (c): a Llama-family Leader and a Qwen2-family Follower, two engines."""
    yield from _serve(
        tmp_path_factory,
        "separate",
        SLHF_CACHE_DIR=str(cache_dir),
        SLHF_FOLLOWER_MODEL=str(qwen_model),
        SLHF_SERVED_MODEL_NAME="pair",
    )


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    """The hostile upstream of ``tests/integration/fake_upstream.py`` on loopback."""
    upstream = FakeUpstream()
    try:
        yield upstream
    finally:
        upstream.stop()


HOSTILE_UPSTREAM_TIMEOUT_S = 3.0
HOSTILE_BODY_TIMEOUT_S = 3.0
HOSTILE_UPSTREAM_MAX_BYTES = 1024 * 1024


@pytest.fixture(scope="session")
def hostile_server(
    tmp_path_factory: pytest.TempPathFactory, random_model: Path, fake_upstream: FakeUpstream
) -> Iterator[ServerProcess]:
    """The random tiny llama with small caps (every accepted request is cheap: the fuzz test
    sends hundreds), short body and upstream timeouts, and ``fake_upstream`` as its upstream."""
    log = tmp_path_factory.mktemp("logs") / "hostile.log"
    server = ServerProcess.start(
        log,
        SLHF_MODEL=str(random_model),
        SLHF_MAX_ROUNDS="2",
        SLHF_MAX_MODEL_LEN="512",
        SLHF_MAX_TOKENS_CAP="16",
        SLHF_MAX_DEADLINE_S="20",
        SLHF_MAX_INFLIGHT_GENERATIONS="1024",
        SLHF_BODY_TIMEOUT_S=str(HOSTILE_BODY_TIMEOUT_S),
        SLHF_UPSTREAM_BASE_URL=fake_upstream.base_url,
        SLHF_UPSTREAM_MODEL="fake",
        SLHF_UPSTREAM_TIMEOUT_S=str(HOSTILE_UPSTREAM_TIMEOUT_S),
        SLHF_UPSTREAM_MAX_BYTES=str(HOSTILE_UPSTREAM_MAX_BYTES),
    )
    try:
        yield server
    finally:
        server.stop()
