"""vLLM rollouts with weight sync on a CUDA GPU (the official vllm wheel; ``make test EXTRA=gpu``).

The same two LoRA steps as tests/integration/models/trainer/test_vllm_rollouts.py, with the training
model and
the in-process vLLM engine on one GPU. Skipped where there is no CUDA device.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def longer_wins(x: Any, a: str, b: str) -> float:
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_two_vllm_steps_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_lora: bool):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slhf_models.preferences import CallablePreference
    from slhf_models.tiny import build_tiny_model
    from slhf_models.trainer.config import StackelbergConfig
    from slhf_models.trainer.trainer import StackelbergTrainer

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir = build_tiny_model(tmp_path / "tiny", seed=0)
    cfg = StackelbergConfig(
        model=str(model_dir),
        dataset="unused",
        output_dir=str(tmp_path / "run"),
        batch_size=2,
        max_new_tokens=8,
        steps=2,
        use_lora=use_lora,
        lora_r=4,
        lora_alpha=8.0,
        learning_rate=1e-2,
        rollout_backend="vllm",
        vllm_gpu_memory_utilization=0.2,
        vllm_max_model_len=256,
        vllm_enforce_eager=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = None if use_lora else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = ["What is the map?", "Tell me about the river.", "Why does it rain?"]
    trainer = StackelbergTrainer(
        model, ref, tokenizer, CallablePreference(longer_wins), prompts, cfg
    )
    assert trainer.accelerator.device.type == "cuda"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    history = trainer.train()
    assert [m["step"] for m in history] == [1, 2]
    for m in history:
        assert math.isfinite(m["loss"]) and math.isfinite(m["preference"]), m
    assert trainer.vllm.sync_id == 3  # when built, then after each optimiser step
    # shared weights: synced in memory as merged weights, so the engine runs without LoRA
    assert trainer.vllm.lora == {"leader": None, "follower": None}
    assert trainer.vllm.llm.llm_engine.vllm_config.lora_config is None
