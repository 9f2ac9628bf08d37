"""Real server processes with real vLLM CPU engines on tiny models, shared per session.

Each server is started once (lazily, by the first test that needs it) and stopped at the end of
the session. Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so an idle server
costs no CPU while other tests run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import pytest

from slhf import launcher
from slhf.launcher import clean_env, free_port
from slhf_models.tiny import FACTORY_VERSION, build_tiny_model
from tests.integration.fake_upstream import FakeUpstream

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
__all__ = ["REPO", "ServerProcess", "free_port", "server_env"]  # what test modules import


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def server_env(**settings: str) -> dict[str, str]:
    """The tests' server environment: no SLHF_* from the shell, engines in-process, offline."""
    return clean_env(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        **settings,
    )


class ServerProcess(launcher.ServerProcess):
    """The launcher (``slhf.launcher``) with ``server_env()`` as the base environment and
    the repository as working directory: ``ServerProcess.start(log, SLHF_MODEL=...)``."""

    @classmethod
    def start(
        cls,
        log: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = REPO,
        **options: Any,
    ) -> Self:
        return super().start(log, env=server_env() if env is None else env, cwd=cwd, **options)


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
    env = server_env(
        SLHF_MAX_ROUNDS="4",
        SLHF_MAX_MODEL_LEN="512",
        SLHF_MAX_INFLIGHT_GENERATIONS="1024",
        **settings,
    )
    with ServerProcess.start(log, env=env) as server:
        yield server


@pytest.fixture(scope="session")
def random_model(cache_dir: Path) -> Path:
    """The random tiny llama (``slhf_models.tiny.random_model_dir``) in the session's cache: it
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
    with ServerProcess.start(
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
    ) as server:
        yield server
