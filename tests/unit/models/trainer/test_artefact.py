"""The trained artefact: the base model's dtype, a portable base_model, the model card, the Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from slhf_models.serving.loading import resolve_weights
from slhf_models.serving.manifest import Manifest
from slhf_models.trainer.artefact import portable_base, push_to_hub
from slhf_models.trainer.trainer import StackelbergTrainer
from tests.trainer_helpers import tiny_config, tiny_trainer

PROMPTS = ["What is the map?", "Tell me about the river.", "Why does it rain?"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained(model: Path, out: Path, **overrides: Any) -> StackelbergTrainer:
    cfg = tiny_config(model, out, **({"steps": 1, "preference": "task:arith"} | overrides))
    trainer = tiny_trainer(cfg, PROMPTS, eval_dataset=PROMPTS if cfg.eval_every else None)
    trainer.train()
    return trainer


def safetensors_dtypes(folder: Path) -> set[torch.dtype]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118


def test_a_full_fine_tune_of_a_bf16_model_is_written_in_bf16(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    trainer = trained(tiny, tmp_path / "run", use_lora=False)
    assert next(trainer.policy.parameters()).dtype == torch.float32  # trained in float32
    final = trainer.save_model()
    assert safetensors_dtypes(final) == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(trainer.policy.parameters()).dtype == torch.float32  # the live model is as it was
    assert (final / "model.safetensors").stat().st_size < 0.6 * sum(
        p.numel() * 4 for p in trainer.policy.parameters()
    )
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.bfloat16
    merged = trained(tiny, tmp_path / "lora").save_model(tmp_path / "merged", merged=True)
    assert safetensors_dtypes(merged) == {torch.bfloat16}


def test_adapters_name_the_base_relative_to_their_folder_and_move_with_it(
    tiny: Path, tmp_path: Path
) -> None:
    final = trained(tiny, tmp_path / "work" / "run").save_model()
    base = Manifest.load(final).base_model
    assert not Path(base).is_absolute() and base.startswith("..")
    assert (final / base).resolve() == tiny.resolve()
    # the whole tree copied elsewhere (another machine): the base resolves against the manifest
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny, moved / tiny.relative_to(tmp_path.parent))
    shutil.copytree(final, moved / final.relative_to(tmp_path.parent))
    weights = resolve_weights(moved / final.relative_to(tmp_path.parent))
    assert weights.leader.model == str((moved / tiny.relative_to(tmp_path.parent)).resolve())
    assert weights.leader.adapter is not None and weights.leader.adapter.startswith(str(moved))


def test_portable_base_prefers_hub_ids(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert portable_base(str(snapshot), tmp_path / "run" / "final") == "Qwen/Qwen2.5-0.5B"
    assert portable_base("Qwen/Qwen2.5-0.5B", tmp_path) == "Qwen/Qwen2.5-0.5B"
    (tmp_path / "run" / "base").mkdir(parents=True)
    assert portable_base(str(tmp_path / "run" / "base"), tmp_path / "run") == "./base"


def test_the_model_card_says_what_was_trained_on_what_and_how_it_scored(
    tiny: Path, tmp_path: Path
) -> None:
    trainer = trained(tiny, tmp_path / "run", eval_every=1, eval_dataset="held-out")
    card = (trainer.save_model() / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "- slhf" in card
    assert "base_model" not in card.split("---")[1]  # a local base is no Hub id
    assert "# run" in card and "prompts: `unused`" in card and "preference: `task:arith`" in card
    assert "τL 0.001, τF 0.001, κ 5" in card and "KL estimator k1" in card
    assert "At step 1 on the held-out prompts: follower_vs_leader " in card
    plain = trained(tiny, tmp_path / "plain").save_model()
    assert "Not evaluated during training" in (plain / "README.md").read_text()


class FakeHfApi:
    """Records the calls ``push_to_hub`` makes; touches no network."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kw: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def create_branch(self, repo_id: str, **kw: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw: Any) -> Any:
        self.calls.append(("upload_folder", kw))
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        self.calls.append(("files", {"names": files}))
        return type("CommitInfo", (), {"commit_url": "https://hf.co/org/m/commit/1"})()


def test_push_to_hub_creates_the_repo_and_branch_and_uploads_the_folder(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = trained(
        tiny, tmp_path / "run", push_to_hub=True, hub_model_id="org/m", hub_revision="v1"
    )
    api = FakeHfApi()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    with pytest.raises(ValueError, match=r"names the local base model .*\(--merged\)"):
        trainer.save_model()  # adapters on a local base: nothing the Hub could serve
    assert api.calls == []
    trainer.save_model(merged=True)
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder", "files"]
    assert api.calls[0][1] == {"repo_id": "org/m", "repo_type": "model", "exist_ok": True}
    assert api.calls[1][1]["branch"] == "v1"
    upload = api.calls[2][1]
    assert upload["repo_id"] == "org/m" and upload["revision"] == "v1"
    assert {"README.md", "slhf.json", "model.safetensors"} <= set(api.calls[3][1]["names"])
    assert push_to_hub(tmp_path / "run" / "final", "org/x", api=FakeHfApi()).startswith("https")
