"""Shared pieces of the trainer tests: a small config on a tiny model, a cheap preference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slhf_models.preferences import CallablePreference
from slhf_models.trainer.config import StackelbergConfig
from slhf_models.trainer.trainer import StackelbergTrainer

#: Small and fast: 2 prompts per step, 8 new tokens, a rank-4 LoRA, a large learning rate.
TINY_RUN: dict[str, Any] = dict(
    dataset="unused",
    batch_size=2,
    max_new_tokens=8,
    steps=2,
    lora_r=4,
    lora_alpha=8.0,
    learning_rate=1e-2,
    log_every=1,
)


def longer_wins(x: Any, a: str, b: str) -> float:
    """A preference a test can predict: the longer answer wins, equal lengths tie."""
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


def tiny_config(model_dir: Path, out: Path, **overrides: Any) -> StackelbergConfig:
    return StackelbergConfig(
        **({"model": str(model_dir), "output_dir": str(out), **TINY_RUN} | overrides)
    )


def tiny_trainer(
    cfg: StackelbergConfig, prompts: Sequence[Any], **kwargs: Any
) -> StackelbergTrainer:
    """The trainer on ``cfg.model`` in float32; a full fine-tune gets a frozen reference copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = AutoModelForCausalLM.from_pretrained
    ref = None if cfg.use_lora else load(cfg.model, dtype=torch.float32)
    return StackelbergTrainer(
        load(cfg.model, dtype=torch.float32),
        ref,
        AutoTokenizer.from_pretrained(cfg.model),
        CallablePreference(longer_wins),
        list(prompts),
        cfg,
        **kwargs,
    )
