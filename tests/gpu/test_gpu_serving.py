"""The server on a CUDA GPU with the official vllm wheel (``make test EXTRA=gpu``).

Skipped where there is no CUDA device: CI here has none; run it on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_lora_topology_refines_on_gpu(tmp_path: Path) -> None:
    from slhf_models.tiny import build_tiny_model
    from tests.integration.conftest import ServerProcess

    model = build_tiny_model(tmp_path / "tiny-lora", family="llama", adapters=True)
    server = ServerProcess.start(
        tmp_path / "server.log", SLHF_MODEL=str(model), SLHF_GPU_MEMORY_UTILIZATION="0.3"
    )
    try:
        r = httpx.post(
            server.url + "/v1/refine", json={"prompt": "Explain gravity", "rounds": 2}, timeout=120
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["leader"]["usage"]["completion_tokens"] >= 1 and len(body["rounds"]) >= 1
    finally:
        server.stop()
