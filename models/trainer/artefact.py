"""The trained artefact: servable weights, the tokenizer and ``slhf.json``, written atomically.

LoRA runs write the adapters (``adapters/`` when shared, ``adapters/leader`` and
``adapters/follower`` when separate) on top of a reference to the base model, or with
``merged=True`` full weights with the shared adapter merged in. A full fine-tune writes full
weights. The manifest records the template, the sampling defaults and the config hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.manifest import Manifest, RoleSpec, SamplingDefaults, TemplateSpec
from models.templates import ROLES, Role
from models.trainer.config import StackelbergConfig


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
        base = "." if roles["leader"].adapter is None else None
        manifest(config, roles, base_model=base, uses_chat=uses_chat).save(tmp)
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
        full.save_pretrained(folder)
        return {r: RoleSpec(sampling=sampling) for r in ROLES}
    model.save_pretrained(folder / "adapters")
    adapter = {r: "adapters" if adapters[r] is None else f"adapters/{r}" for r in ROLES}
    return {r: RoleSpec(adapter=adapter[r], sampling=sampling) for r in ROLES}


def manifest(
    cfg: StackelbergConfig, roles: dict[Role, RoleSpec], *, base_model: str | None, uses_chat: bool
) -> Manifest:
    base = base_model or cfg.model
    if base_model is None and Path(cfg.model).exists():
        base = str(Path(cfg.model).resolve())
    name = cfg.run_name or Path(cfg.output_dir).name
    return Manifest(
        name=re.sub(r"[^A-Za-z0-9._/-]", "-", name).strip("-./") or "slhf",
        base_model=base,
        leader=roles["leader"],
        follower=roles["follower"],
        template=TemplateSpec(
            layout="chat" if uses_chat else "plain",
            follower_instruction=cfg.follower_instruction,
        ),
        provenance={
            "producer": "slhf train",
            "config_hash": config_hash(cfg),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "steps": cfg.steps,
        },
    )
