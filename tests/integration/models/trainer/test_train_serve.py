"""Train a tiny model for two steps, serve the output with ``slhf serve``, refine an answer."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch

from slhf_models.preferences import CallablePreference
from slhf_models.tiny import build_tiny_model
from slhf_models.trainer.config import StackelbergConfig
from slhf_models.trainer.trainer import StackelbergTrainer
from tests.integration.conftest import ServerProcess


def test_trained_weights_serve_a_refinement(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_model(tmp_path / "tiny", seed=0)
    cfg = StackelbergConfig(
        model=str(base),
        dataset="unused",
        output_dir=str(tmp_path / "run"),
        batch_size=2,
        max_new_tokens=8,
        steps=2,
        lora_r=4,
        follower_instruction="Make it better.",
    )
    trainer = StackelbergTrainer(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        None,
        AutoTokenizer.from_pretrained(base),
        CallablePreference(lambda x, a, b: float(len(a) >= len(b))),
        ["What is the map?", "Tell me about the river."],
        cfg,
    )
    trainer.train()
    final = trainer.save_model(merged=True)
    server = ServerProcess.start(tmp_path / "server.log", SLHF_MODEL=str(final))
    try:
        r = httpx.post(
            server.url + "/v1/refine",
            json={
                "prompt": "What is the map?",
                "rounds": 1,
                "leader": {"max_tokens": 8},
                "follower": {"max_tokens": 8},
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["leader"]["source"] == "leader" and len(body["rounds"]) == 1
        assert body["final"] == body["rounds"][0]["text"]
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        assert "run" in str(models)
    finally:
        server.stop()
