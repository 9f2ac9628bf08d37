"""Smoke tests of StackelbergTrainer: a tiny model, batch 2, 8 new tokens, a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from slhf_models.serving.loading import resolve_weights
from slhf_models.serving.manifest import Manifest
from slhf_models.trainer.checkpoint import latest_checkpoint
from slhf_models.trainer.trainer import TIMING_KEYS, StackelbergTrainer
from tests.trainer_helpers import tiny_config, tiny_trainer

PROMPTS = [
    "What is the map?",
    "Tell me about the river.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why does it rain?"}],
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_trainer(model_dir: Path, out: Path, **overrides: Any) -> StackelbergTrainer:
    return tiny_trainer(tiny_config(model_dir, out, **({"steps": 3} | overrides)), PROMPTS)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]


def checkpoint_params(out: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / f"step-{step}" / "params.pt", weights_only=True)


def test_three_steps_have_finite_losses_and_move_the_shared_adapter(
    tiny: Path, tmp_path: Path
) -> None:
    trainer = make_trainer(tiny, tmp_path, save_every=1)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    history = trainer.train()
    assert [m["step"] for m in history] == [1, 2, 3]
    for m in history:
        for key in ("loss", "loss/leader", "loss/follower", "sequence_kl/leader", "preference"):
            assert math.isfinite(m[key]), (key, m)
        # the sampling distribution's entropy per role: positive, at most log(vocabulary)
        for role in ("leader", "follower"):
            assert 0 < m[f"entropy/{role}"] <= math.log(1024) + 1e-6, m
        assert m["lr"] == trainer.config.learning_rate  # constant schedule, no warm-up
        assert m["length/leader"] <= 8 and m["prompts_per_s"] > 0
    previous = before
    for step in (1, 2, 3):  # the (shared) Follower weights change every step
        now = checkpoint_params(tmp_path, step)
        assert any(not torch.equal(previous[n], now[n]) for n in now)
        previous = now
    assert read_metrics(tmp_path) == [
        {k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history
    ]


def test_leader_adapter_changes_only_on_leader_steps(tiny: Path, tmp_path: Path) -> None:
    # follower_weights=separate_adapter: "Leader parameters" = the leader LoRA adapter.
    trainer = make_trainer(
        tiny, tmp_path, follower_weights="separate_adapter", leader_update_every=2, save_every=1
    )
    snapshots = [{n: p.detach().clone() for n, p in trainer.params.items()}]
    history = trainer.train()
    snapshots += [checkpoint_params(tmp_path, step) for step in (1, 2, 3)]
    assert [m["leader_update"] for m in history] == [False, True, False]

    def changed(role: str, step: int) -> bool:
        a, b = snapshots[step - 1], snapshots[step]
        return any(not torch.equal(a[n], b[n]) for n in a if f".{role}." in n)

    assert [changed("follower", s) for s in (1, 2, 3)] == [True, True, True]
    assert [changed("leader", s) for s in (1, 2, 3)] == [False, True, False]


def test_a_resumed_run_reproduces_the_uninterrupted_run(tiny: Path, tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    make_trainer(tiny, whole, steps=4).train()
    make_trainer(tiny, split, steps=2, save_every=2).train()
    assert latest_checkpoint(split) == split / "checkpoints" / "step-2"
    (split / "log.jsonl").open("a").write(json.dumps({"step": 3, "loss": 0.0}) + "\n")  # lost
    make_trainer(tiny, split, steps=4, resume_from="latest").train()
    assert read_metrics(split) == read_metrics(whole)
    assert [m["step"] for m in read_metrics(split)] == [1, 2, 3, 4]
    a, b = checkpoint_params(whole, 4), checkpoint_params(split, 4)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_save_model_writes_servable_adapters_and_merged_weights(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(
        tiny,
        tmp_path / "run",
        steps=1,
        follower_instruction="Make it better.",
        temperature=0.7,
    )
    trainer.train()
    adapters = trainer.save_model(tmp_path / "adapters")
    weights = resolve_weights(adapters)
    assert weights.topology == "lora"
    assert weights.leader.adapter == weights.follower.adapter == str(adapters / "adapters")
    assert weights.leader.model == str(tiny.resolve())
    manifest = Manifest.load(adapters)
    assert manifest.template.follower_instruction == "Make it better."
    assert manifest.follower.sampling.temperature == 0.7 and manifest.leader.sampling.top_k == -1
    assert manifest.provenance["producer"] == "slhf train" and manifest.provenance["config_hash"]

    merged = trainer.save_model(tmp_path / "merged", merged=True)
    assert resolve_weights(merged).topology == "shared"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
