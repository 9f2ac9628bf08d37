"""Fixtures shared by the unit tests that train or load the random tiny llama."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from slhf_models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random tiny llama of ``slhf_models.tiny`` (seed 0, bf16 on disk), built once per
    module."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test on one torch thread: with tiny matmuls a second thread only adds contention
    (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
