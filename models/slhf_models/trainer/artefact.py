"""The trained artefact: servable weights, the tokenizer and ``slhf.json``, written atomically.

LoRA runs write the adapters (``adapters/`` when shared, ``adapters/leader`` and
``adapters/follower`` when separate) on top of a reference to the base model, or with
``merged=True`` full weights with the shared adapter merged in. A full fine-tune writes full
weights, in the base model's dtype (training runs in float32: a bf16 base is written as bf16;
adapters stay float32, they are small). The manifest records the template, the sampling
defaults and the config hash; its ``base_model`` is portable: a Hub id, or a local base folder
as a path relative to the artefact's folder (the server resolves it against the manifest's
folder, models/slhf_models/serving/manifest.py), never an absolute path of the training machine.
``README.md`` is a model card (models/slhf_models/trainer/model_card.py). ``push_to_hub`` uploads
the folder
with ``huggingface_hub``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from slhf_models.serving.manifest import Manifest, RoleSpec, SamplingDefaults, TemplateSpec
from slhf_models.serving.templates import ROLES, Role
from slhf_models.trainer import model_card
from slhf_models.trainer.config import HUB_ID, StackelbergConfig
from slhf_models.trainer.reporting import METRICS_FILE


def config_hash(config: StackelbergConfig) -> str:
    """sha256 of the config's settings, for the manifest's provenance."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_artefact(
    out: Path,
    model: Any,
    tokenizer: Any,
    config: StackelbergConfig,
    *,
    adapters: dict[Role, str | None],
    uses_chat: bool,
    merged: bool,
) -> Path:
    """Write weights + tokenizer + manifest into a temporary sibling, then rename it to ``out``."""
    if merged and config.follower_weights == "separate_adapter":
        raise ValueError("merged=True needs shared weights; separate adapters cannot merge")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        roles = _write_weights(tmp, model, config, adapters, merged)
        tokenizer.save_pretrained(tmp)
        base = "." if roles["leader"].adapter is None else portable_base(config.model, out)
        written = manifest(config, roles, base_model=base, uses_chat=uses_chat)
        written.save(tmp)
        evaluation = model_card.last_evaluation(Path(config.output_dir) / METRICS_FILE)
        card = model_card.render(config, written, evaluation=evaluation)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(
    folder: Path,
    model: Any,
    cfg: StackelbergConfig,
    adapters: dict[Role, str | None],
    merged: bool,
) -> dict[Role, RoleSpec]:
    sampling = SamplingDefaults(
        max_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k if cfg.top_k > 0 else -1,
    )
    if not cfg.use_lora or merged:
        full = copy.deepcopy(model).merge_and_unload() if cfg.use_lora else model
        _save_in_dtype(full, folder, base_dtype(cfg.model, full))
        return {r: RoleSpec(sampling=sampling) for r in ROLES}
    model.save_pretrained(folder / "adapters")
    adapter = {r: "adapters" if adapters[r] is None else f"adapters/{r}" for r in ROLES}
    return {r: RoleSpec(adapter=adapter[r], sampling=sampling) for r in ROLES}


def base_dtype(base: str, model: Any) -> torch.dtype:
    """The dtype the base model was published in (its config.json); the model's own if unknown."""
    from transformers import AutoConfig

    try:
        dtype = AutoConfig.from_pretrained(base).dtype
    except (OSError, ValueError):
        dtype = None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else model.dtype


def _save_in_dtype(model: Any, folder: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` with the weights (and config.json's ``dtype``) cast to ``dtype``."""
    cast: dict[int, torch.Tensor] = {}  # one copy per storage: tied weights stay tied
    state = {
        k: cast.setdefault(v.data_ptr(), v.to(dtype) if v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    model.save_pretrained(folder, state_dict=state)
    config = folder / "config.json"  # transformers writes the live parameters' dtype
    values = json.loads(config.read_text(encoding="utf-8"))
    values["dtype"] = str(dtype).removeprefix("torch.")
    config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_HF_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


def portable_base(base: str, out: Path) -> str:
    """``base`` as the manifest should name it: a Hub id (also for a folder in the HF cache), or
    a local folder relative to ``out``, the artefact's folder."""
    path = Path(base).expanduser()
    if not path.exists():
        return base  # a Hub id
    resolved = path.resolve()
    if cached := _HF_CACHE.search(resolved.as_posix()):
        return f"{cached.group(1)}/{cached.group(2)}"
    relative = Path(os.path.relpath(resolved, out.resolve())).as_posix()
    return relative if relative.startswith("..") else f"./{relative}"


def push_to_hub(folder: Path, repo_id: str, *, revision: str | None = None, api: Any = None) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if missing), on branch
    ``revision`` (created if missing); returns the commit's URL. ``api``: an ``HfApi``."""
    from huggingface_hub import HfApi

    base = Manifest.load(folder).base_model
    if base != "." and not re.fullmatch(HUB_ID, base):
        raise ValueError(
            f"{folder}/slhf.json names the local base model {base!r}, which the Hub cannot "
            "resolve: train from a Hub id (model: org/name), or save merged=True (--merged)"
        )
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=f"slhf train: {Manifest.load(folder).name}",
    )
    return str(commit.commit_url)


def manifest(
    cfg: StackelbergConfig, roles: dict[Role, RoleSpec], *, base_model: str, uses_chat: bool
) -> Manifest:
    base = base_model
    name = cfg.run_name or Path(cfg.output_dir).name
    return Manifest(
        name=re.sub(r"[^A-Za-z0-9._/-]", "-", name).strip("-./") or "slhf",
        base_model=base,
        leader=roles["leader"],
        follower=roles["follower"],
        template=TemplateSpec(
            layout="chat" if uses_chat else "plain",
            follower_instruction=cfg.follower_instruction,
            bos=cfg.resolved_template_bos(),
        ),
        provenance={
            "producer": "slhf train",
            "config_hash": config_hash(cfg),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "steps": cfg.steps,
        },
    )
