"""How the policy is held while it trains (models/slhf_models/trainer/weights.py): the dtype
setting, dropout off while scoring, gradient checkpointing that changes no gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slhf_models.trainer.rollouts import RolloutPair
from slhf_models.trainer.trainer import StackelbergTrainer
from slhf_models.trainer.weights import torch_dtype
from tests.trainer_helpers import tiny_config, tiny_trainer

PROMPTS = ["What is the map?", "Tell me about the river.", "Why does it rain?", "Name a tree."]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rollouts(trainer: StackelbergTrainer) -> RolloutPair:
    torch.manual_seed(0)
    return trainer.sample_pair(list(PROMPTS))


def test_dtype_auto_is_float32_without_a_bf16_gpu() -> None:
    assert torch_dtype("float16") is torch.float16 and torch_dtype("bfloat16") is torch.bfloat16
    expected = (
        torch.bfloat16
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else torch.float32
    )
    assert torch_dtype("auto") is expected


@pytest.mark.parametrize("disable", [True, False])
def test_scoring_in_train_mode_is_deterministic_only_with_dropout_off(
    tiny: Path, tmp_path: Path, disable: bool
) -> None:
    cfg = tiny_config(tiny, tmp_path, lora_dropout=0.3, disable_dropout=disable, batch_size=4)
    trainer = tiny_trainer(cfg, PROMPTS)
    leader = rollouts(trainer).leader
    with torch.no_grad():  # LoRA's B starts at 0, which hides the dropout before it
        for name, param in trainer.params.items():
            param.normal_(0.0, 0.2) if "lora_B" in name else None
    assert trainer.policy.training  # scoring runs in train() mode
    with torch.no_grad():
        a = trainer.losses._scored("leader", leader).logprobs
        b = trainer.losses._scored("leader", leader).logprobs
    assert torch.equal(a, b) is disable
    dropouts = [m.p for m in trainer.policy.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all((p == 0.0) is disable for p in dropouts)


@pytest.mark.parametrize("use_lora", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(
    tiny: Path, tmp_path: Path, use_lora: bool
) -> None:
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_config(
            tiny, tmp_path / str(checkpointing), batch_size=4, use_lora=use_lora,
            gradient_checkpointing=checkpointing,
        )  # fmt: skip
        trainer = tiny_trainer(cfg, PROMPTS)
        assert trainer.policy.is_gradient_checkpointing is checkpointing
        pair = rollouts(trainer)
        prefs = torch.tensor([0.9, 0.2, 0.5, 0.7])
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.losses.accumulate(pair, prefs, update_leader=True)
        grads.append({n: p.grad.clone() for n, p in trainer.params.items()})
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_merged_lora_computes_as_the_adapter_and_gives_every_weight_back(
    tiny: Path, tmp_path: Path
) -> None:
    """Sampling runs with the adapter merged into new tensors (weights.merged_lora): the same
    logits as the adapter layers, and on exit each base weight is its own tensor again."""
    from slhf_models.trainer.weights import lora_layers, merged_lora

    trainer = tiny_trainer(tiny_config(tiny, tmp_path, batch_size=4), PROMPTS)
    policy = trainer.policy
    with torch.no_grad():
        for name, param in trainer.params.items():
            param.normal_(0.0, 0.3) if "lora_B" in name else None
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = {n: (p, p.data.clone()) for n, p in policy.named_parameters()}
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits
        with merged_lora(policy):
            got = policy(input_ids=ids).logits
            layer = lora_layers(policy)[0][1]
            assert layer.disable_adapters  # plain linear layers while merged
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-2  # the adapter matters here
    for name, param in policy.named_parameters():
        assert param is before[name][0] and torch.equal(param.data, before[name][1]), name
    with torch.no_grad():
        torch.testing.assert_close(policy(input_ids=ids).logits, want)  # adapters on again
