"""From "what the user asked to serve" to local weights per role.

``resolve_weights`` takes a model folder or HF id (and optionally a separate Follower model),
reads the ``slhf.json`` manifest when there is one, downloads HF repos into the local HF cache
(never in tests: they serve local folders), and returns a ``ServedWeights``: the manifest, the
topology and, for each role, the model folder and the LoRA adapter folder (if any).

Topologies (docs/architecture.md, "Engines and topologies"): "shared" = one model plays both
roles through two templates; "lora" = one base with Leader/Follower adapters in one engine;
"separate" = two models, two engines.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from slhf_models.serving.manifest import MANIFEST_FILE, Manifest, ManifestError, Topology
from slhf_models.serving.templates import Role

#: The demo model trained by ``make demo-model`` (``slhf_models.demo``) and shipped in the package:
#: the server's default when no model is named.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "slhf-condorcet-tiny"


def default_model_dir() -> Path:
    """The server's default model: the shipped demo model (``SHIPPED_MODEL_DIR``)."""
    if not (SHIPPED_MODEL_DIR / MANIFEST_FILE).is_file():
        raise ManifestError(
            f"the shipped demo model is missing ({SHIPPED_MODEL_DIR}): reinstall slhf, or name a "
            "model (SLHF_MODEL or `slhf serve MODEL`); `make demo-model` rebuilds it"
        )
    return SHIPPED_MODEL_DIR


@dataclass(frozen=True)
class RoleWeights:
    model: str
    """Local folder (or HF id when it could not be resolved locally) of the role's model."""
    adapter: str | None = None
    """Local folder of the role's LoRA adapter, if any."""


@dataclass(frozen=True)
class ServedWeights:
    name: str
    manifest: Manifest
    topology: Topology
    leader: RoleWeights
    follower: RoleWeights
    source: str
    """What the user named (folder or HF id), for /v1/models."""

    def role(self, role: Role) -> RoleWeights:
        return self.leader if role == "leader" else self.follower


def _looks_like_hf_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref)) and not ref.startswith(".")


def local_folder(ref: str, revision: str | None = None) -> Path:
    """A local folder for ``ref``: the folder itself, or a snapshot of the HF repo ``ref``."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise ManifestError(f"{ref}: expected a model folder, found a file")
    if not _looks_like_hf_id(ref):
        raise ManifestError(f"{ref}: no such model folder (and not an HF id like 'org/name')")
    from huggingface_hub import snapshot_download  # network; only for real models

    return Path(snapshot_download(ref, revision=revision))


def _default_name(ref: str, folder: Path) -> str:
    name = ref if _looks_like_hf_id(ref) and not Path(ref).exists() else folder.name
    return re.sub(r"[^A-Za-z0-9._/-]", "-", name).strip("-") or "model"


def resolve_weights(
    model: str | os.PathLike[str],
    *,
    follower_model: str | None = None,
    topology: str = "auto",
    served_model_name: str | None = None,
    revision: str | None = None,
) -> ServedWeights:
    """Resolve a model (and optional separate Follower model) into per-role local weights."""
    ref = str(model)
    folder = local_folder(ref, revision)
    if (folder / MANIFEST_FILE).exists():
        manifest = Manifest.load(folder)
    else:
        manifest = Manifest.for_plain_model(_default_name(ref, folder))
    if follower_model is not None:
        if Path(follower_model).expanduser().exists():  # relative to the cwd, not the manifest
            follower_model = str(Path(follower_model).expanduser().resolve())
        if manifest.topology == "lora":
            raise ManifestError(
                f"{ref}: its manifest serves LoRA adapters; a separate follower model "
                f"(SLHF_FOLLOWER_MODEL={follower_model}) cannot be combined with them"
            )
        manifest = manifest.model_copy(
            update={"follower": manifest.follower.model_copy(update={"model": follower_model})}
        )
    if served_model_name:
        manifest = manifest.model_copy(update={"name": served_model_name})

    if topology != "auto" and topology != manifest.topology:
        raise ManifestError(
            f"SLHF_TOPOLOGY={topology} but {ref} is served as topology '{manifest.topology}' "
            f"(from {'its manifest' if (folder / MANIFEST_FILE).exists() else 'having no manifest'}"
            f"{' and SLHF_FOLLOWER_MODEL' if follower_model else ''}); unset SLHF_TOPOLOGY or "
            f"fix the manifest"
        )

    def role_weights(role: Role) -> RoleWeights:
        spec = manifest.role(role)
        if spec.model is not None and spec.model != manifest.base_model:
            m = str(local_folder(manifest.resolve(spec.model, folder) or spec.model, revision))
        else:
            m = str(local_folder(manifest.resolve(manifest.base_model, folder) or ref, revision))
        adapter = manifest.resolve(spec.adapter, folder)
        if adapter is not None:
            adapter = str(local_folder(adapter, revision))
        return RoleWeights(model=m, adapter=adapter)

    return ServedWeights(
        name=manifest.name,
        manifest=manifest,
        topology=manifest.topology,
        leader=role_weights("leader"),
        follower=role_weights("follower"),
        source=ref,
    )
