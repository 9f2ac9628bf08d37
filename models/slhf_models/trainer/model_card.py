"""The model card (``README.md``) written beside the trained weights.

What was trained (base model, LoRA or full weights, topology), on what (dataset, split, steps and
batch), with which preference and recipe (τ, κ, η and its schedule, the KL estimator, the Leader's
objective), the latest evaluation in ``log.jsonl`` if the run evaluated, and how to serve it. The
Hub metadata block comes from ``huggingface_hub.ModelCardData``, so the Hub reads it as it writes
it (``base_model`` only when it is a Hub id).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from slhf_models.serving.manifest import Manifest
from slhf_models.trainer.config import HUB_ID, StackelbergConfig


def last_evaluation(log: Path) -> dict[str, float]:
    """The ``eval/*`` values of the last evaluation in a run's ``log.jsonl`` (empty if none)."""
    if not log.exists():
        return {}
    found: dict[str, float] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if any(key.startswith("eval/") for key in row):
            found = {"step": row["step"], **{k: v for k, v in row.items() if k.startswith("eval/")}}
    return found


def render(cfg: StackelbergConfig, manifest: Manifest, *, evaluation: dict[str, Any]) -> str:
    """The card's text: a YAML metadata block, then Markdown."""
    from huggingface_hub import ModelCard, ModelCardData

    base = manifest.base_model
    hub_base = base if re.fullmatch(HUB_ID, base) else None
    adapters = manifest.topology == "lora"
    data = ModelCardData(
        base_model=hub_base or (cfg.model if re.fullmatch(HUB_ID, cfg.model) else None),
        library_name="peft" if adapters else "transformers",
        tags=["slhf", "stackelberg", "refinement"],
        datasets=[cfg.dataset] if re.fullmatch(HUB_ID, cfg.dataset) else None,
    )
    weights = "LoRA adapters" if adapters else "full weights"
    if adapters and manifest.leader.adapter != manifest.follower.adapter:
        weights = "one LoRA adapter per role"
    lines = [
        f"# {manifest.name}",
        "",
        f"A Leader and a Follower trained with StackelbergGDA (Stackelberg Learning from Human "
        f"Feedback) by `slhf train`: {weights} on `{_name(cfg.model)}`, served as topology "
        f"`{manifest.topology}`. The Leader answers a prompt; the Follower refines an answer.",
        "",
        "## Training",
        "",
        f"- prompts: `{_name(cfg.dataset)}` "
        f"(split `{cfg.dataset_split}`, field `{cfg.prompt_field}`)",
        f"- preference: `{cfg.preference or 'a Python object (StackelbergTrainer API)'}`",
        f"- steps {cfg.steps}, batch {cfg.batch_size} prompts per process, "
        f"{cfg.max_new_tokens} new tokens at temperature {cfg.temperature}",
        f"- τL {cfg.tau_leader:g}, τF {cfg.tau_follower:g}, κ {cfg.kappa:g}, "
        f"learning rate {cfg.learning_rate:g} ({cfg.lr_schedule}, {cfg.warmup_steps} warm-up "
        f"steps), KL estimator {cfg.kl_estimator}, Leader objective {cfg.leader_objective}",
        f"- config hash `{manifest.provenance.get('config_hash')}`; the template and sampling "
        "defaults are in `slhf.json` (serving with another template breaks the model)",
        "",
        "## Evaluation",
        "",
        _evaluation_text(evaluation),
        "",
        "## Use",
        "",
        "```bash",
        "slhf serve <this folder or Hub id>   # OpenAI-compatible API + /v1/refine",
        "```",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _evaluation_text(evaluation: dict[str, Any]) -> str:
    if not evaluation:
        return "Not evaluated during training (set `eval_dataset` and `eval_every`)."
    values = ", ".join(
        f"{k.removeprefix('eval/')} {v:.4g}" for k, v in evaluation.items() if k != "step"
    )
    return f"At step {evaluation['step']} on the held-out prompts: {values}."


def _name(ref: str) -> str:
    """A Hub id as it is; a local path by its last part (no paths of the training machine)."""
    return ref if re.fullmatch(HUB_ID, ref) and not Path(ref).exists() else Path(ref).name
