"""Which weights train: LoRA adapters on the policy (shared, or one per role) or every weight.

``follower_weights: shared`` puts one adapter on the model; ``separate_adapter`` puts a
``leader`` and a ``follower`` adapter on one base, with learning rates η and κ·η.
"""

from __future__ import annotations

from typing import Any

import torch

from slhf_models.serving.templates import Role
from slhf_models.trainer.config import StackelbergConfig


def with_lora(model: Any, cfg: StackelbergConfig) -> Any:
    """``model`` wrapped by peft with the config's adapter(s)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: floats work
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    if cfg.follower_weights == "shared":
        return get_peft_model(model, lora)
    model = get_peft_model(model, lora, adapter_name="leader")
    model.add_adapter("follower", lora)
    return model


def trainable_params(model: Any, use_lora: bool) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters (made trainable), or every parameter in a full fine-tune."""
    if not use_lora:
        return dict(model.named_parameters())
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    return params


def role_params(params: dict[str, torch.nn.Parameter], role: Role) -> list[torch.nn.Parameter]:
    return [p for n, p in params.items() if f".{role}." in n]


def param_groups(
    params: dict[str, torch.nn.Parameter], cfg: StackelbergConfig
) -> list[dict[str, Any]]:
    """One group at η (shared weights), or the leader adapter at η and the follower's at κ·η."""
    if cfg.follower_weights == "shared":
        return [{"params": list(params.values()), "lr": cfg.learning_rate}]
    return [
        {"params": role_params(params, "leader"), "lr": cfg.learning_rate},
        {"params": role_params(params, "follower"), "lr": cfg.follower_learning_rate},
    ]
