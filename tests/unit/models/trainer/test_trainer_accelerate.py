"""StackelbergTrainer: gradient accumulation, a full fine-tune with a reference model, evaluation
and TensorBoard logging. A tiny model, batch 2-4, 8 new tokens, 1-2 steps. Two processes under
torch.distributed: tests/integration/models/trainer/test_distributed.py."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from slhf_models.trainer.config import StackelbergConfig
from slhf_models.trainer.trainer import TIMING_KEYS, StackelbergTrainer
from tests.trainer_helpers import tiny_config, tiny_trainer

PROMPTS = ["What is the map?", "Tell me about the river.", "Why does it rain?", "Name a tree."]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(model_dir: Path, out: Path, **overrides: Any) -> StackelbergConfig:
    return tiny_config(model_dir, out, **({"lora_dropout": 0.0} | overrides))


def make_trainer(model_dir: Path, out: Path, **overrides: Any) -> StackelbergTrainer:
    cfg = settings(model_dir, out, **overrides)
    return tiny_trainer(cfg, PROMPTS, eval_dataset=PROMPTS[:3] if cfg.eval_every else None)


def grads_after_accumulate(
    trainer: StackelbergTrainer, micro_batches: int, *, spliced: bool = True
) -> dict[str, Any]:
    torch.manual_seed(0)
    pair = trainer.sample_pair(list(PROMPTS))
    if not spliced:  # score the Leader from its own rows (a template without the splice)
        pair = dataclasses.replace(pair, leader_in_follower=None)
    prefs = torch.tensor([0.9, 0.2, 0.5, 0.7], device=trainer.accelerator.device)
    trainer.config.gradient_accumulation_steps = micro_batches
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.losses.accumulate(pair, prefs, update_leader=True)
    return {n: p.grad.clone() for n, p in trainer.params.items()}


@pytest.mark.parametrize("leader_objective", ["full", "paper"])
def test_both_roles_scored_from_the_follower_row_give_the_gradients_of_two_passes(
    tiny: Path, tmp_path: Path, leader_objective: str
) -> None:
    """Shared weights, the Follower prompt spliced from the Leader's sequence: one pass and one
    backward over the Follower's rows give the gradient of a pass and a backward per role."""
    trainer = make_trainer(tiny, tmp_path, batch_size=4, leader_objective=leader_objective)
    assert trainer.sample_pair(list(PROMPTS)).leader_in_follower is not None
    one_pass = grads_after_accumulate(trainer, 1)
    per_role = grads_after_accumulate(trainer, 1, spliced=False)
    assert any(g.abs().sum() > 0 for g in one_pass.values())
    atol = 1e-4 if trainer.accelerator.device.type == "cuda" else 1e-6
    for name in one_pass:
        torch.testing.assert_close(one_pass[name], per_role[name], rtol=1e-4, atol=atol)


@pytest.mark.parametrize("baseline", ["constant", "leave_one_out"])
@pytest.mark.parametrize("weights", ["shared", "separate_adapter"])
def test_two_micro_batches_of_two_give_the_gradients_of_one_batch_of_four(
    tiny: Path, tmp_path: Path, weights: str, baseline: str
) -> None:
    # Splitting the batch into micro-batches (each loss / n, gradients summed) must be exact up
    # to float rounding. With the constant baseline each row's term depends on that row only;
    # the leave-one-out baseline is computed over the whole step first (with the Leader's full
    # objective, after a no-grad pass for every row's Follower KL), not per micro-batch.
    trainer = make_trainer(
        tiny, tmp_path, batch_size=4, follower_weights=weights, baseline=baseline
    )
    one = grads_after_accumulate(trainer, 1)
    two = grads_after_accumulate(trainer, 2)
    assert any(g.abs().sum() > 0 for g in one.values())
    # CUDA matmuls of different batch shapes reduce in other orders (and may use TF32): seen on an
    # H200, gradients of size ~1e-3 differed by up to 1.2e-5. On CPU they agree to 1e-6.
    atol = 1e-4 if trainer.accelerator.device.type == "cuda" else 1e-6
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=atol)


def test_a_full_fine_tune_with_a_ref_model_moves_every_weight_and_starts_at_zero_kl(
    tiny: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny, tmp_path / "run", use_lora=False, learning_rate=1e-3)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    history = trainer.train()
    assert history[0]["sequence_kl/leader"] == pytest.approx(0.0, abs=1e-6)  # π_θ = π_ref at step 1
    assert all(math.isfinite(m["loss"]) for m in history)
    moved = [n for n, p in trainer.params.items() if not torch.equal(before[n], p)]
    assert len(moved) == len(before)
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(before[n], ref[n]) for n in before)  # the reference stays frozen
    final = trainer.save_model()
    model = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_evaluation_and_tensorboard_log_without_changing_the_training_run(
    tiny: Path, tmp_path: Path
) -> None:
    import tensorboard  # noqa: F401  # in the train extra: a missing install must fail

    plain = make_trainer(tiny, tmp_path / "plain").train()
    evaluated = make_trainer(
        tiny, tmp_path / "eval", eval_every=1, eval_dataset="held-out", report_to="tensorboard"
    ).train()

    def strip(m: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in m.items() if k not in TIMING_KEYS}

    assert [strip(m) for m in evaluated] == [strip(m) for m in plain]
    lines = [json.loads(x) for x in (tmp_path / "eval" / "log.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/follower_vs_leader" in m]
    assert [m["step"] for m in evals] == [1, 2]
    assert all(0.0 <= m["eval/follower_vs_leader"] <= 1.0 for m in evals)
    assert all(m["eval/prompts"] == 3 for m in evals)
    assert list((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents.*"))
