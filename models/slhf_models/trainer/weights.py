"""Which weights train and how they are held: the dtype the models load in, LoRA adapters on the
policy (shared, or one per role) or every weight, dropout off and gradient checkpointing.

``follower_weights: shared`` puts one adapter on the model; ``separate_adapter`` puts a
``leader`` and a ``follower`` adapter on one base, with learning rates η and κ·η.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager
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


def torch_dtype(name: str) -> torch.dtype:
    """The config's ``dtype``: ``auto`` is bfloat16 on a CUDA device that supports it, else
    float32 (CPUs: bf16 matmuls are slow or emulated on many, and TRL defaults to fp32 there)."""
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def disable_dropout(model: Any) -> int:
    """Every dropout of ``model`` (LoRA's ``lora_dropout`` modules, the model's own, attention
    dropout read from a module attribute) set to 0; returns how many were on."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, changed = 0.0, changed + 1
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "attention_dropout", None), float):
        config.attention_dropout = 0.0
    return changed


def prepare_policy(model: Any, cfg: StackelbergConfig) -> Any:
    """The policy as it trains: gradient checkpointing (non-reentrant, so frozen inputs need no
    grad), LoRA adapters, dropout off (``disable_dropout``), in ``train()`` mode."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generate() turns it back on in eval mode
    model = with_lora(model, cfg) if cfg.use_lora else model
    if cfg.disable_dropout:
        disable_dropout(model)
    return model.train()


def lora_layers(policy: Any) -> list[tuple[str, Any]]:
    """The policy's LoRA layers (peft ``LoraLayer``), with their module names."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in policy.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merged_weight(layer: Any) -> torch.Tensor:
    """A LoRA layer's base weight with its active adapter merged, ``W + scaling·B·A``, as a new
    tensor in ``W``'s dtype (peft's ``get_delta_weight``); the layer is not changed."""
    base = layer.get_base_layer()
    weight = base.weight.detach()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


@contextmanager
def merged_lora(policy: Any, enabled: bool = True) -> Iterator[None]:
    """While open, the policy computes with its active LoRA adapter merged into the base
    weights and the adapter layers off: plain linear layers, as fast as the base model (sampling
    decodes token by token, and each LoRA layer adds two matmuls and an add to every step).
    The merged weights are new tensors; on exit every base weight gets its own tensor back, bit
    for bit (merging and unmerging in place would leave ``W + Δ − Δ ≠ W``, drifting every step).
    Costs one copy of the adapted weights while open. Not under FSDP (sharded DTensors)."""
    if not enabled:
        yield
        return
    saved = []
    try:
        for _, layer in lora_layers(policy):
            weight = layer.get_base_layer().weight
            merged = merged_weight(layer)
            saved.append((weight, weight.data))
            weight.data = merged
        with policy.disable_adapter():
            yield
    finally:
        for weight, data in saved:
            weight.data = data


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed_cpu_memory(device: torch.device) -> None:
    """On a CPU, hand the heap pages freed by a backward pass back to the system (glibc's
    ``malloc_trim``): glibc keeps them resident otherwise, and the next role's pass then adds
    its activations on top of them. A no-op on other devices (their allocators reuse memory)
    and where the C library has no ``malloc_trim``."""
    libc = _libc() if device.type == "cpu" else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
