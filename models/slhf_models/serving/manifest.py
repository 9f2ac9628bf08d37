"""The weights manifest ``slhf.json``: what the trainer hands to the server.

A manifest sits beside the weights and says how to serve them::

    {
      "format_version": 1,
      "name": "slhf-tiny-llama",
      "base_model": ".",                       # relative to the manifest's folder, or an HF id
      "leader":   {"adapter": null,
                   "sampling": {"temperature": 0.9, "top_k": 50, "max_tokens": 512}},
      "follower": {"adapter": "follower-lora", "model": null, "sampling": {...}},
      "template": {"layout": "chat", "follower_instruction": "Improve the previous answer. ..."},
      "default_rounds": 2,
      "provenance": {"producer": "slhf train", "config_hash": "…", "created": "2026-11-26T…"}
    }

Topology follows from the roles: a ``follower.model`` (or ``leader.model``) other than the base is
served as two engines ("separate"); an adapter on either role as one engine with LoRA ("lora");
otherwise one model plays both roles through the two templates ("shared", the paper's default).

A plain model folder without a manifest is served as "shared" with the paper's instruction:
``Manifest.for_plain_model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slhf_models.serving.templates import (
    DEFAULT_FOLLOWER_INSTRUCTION,
    DEFAULT_PLAIN_SEPARATOR,
    TemplateConfig,
)

MANIFEST_FILE = "slhf.json"
FORMAT_VERSION = 1
Topology = Literal["shared", "lora", "separate"]


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or invalid; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(_Strict):
    """Per-role sampling defaults; a request's own values override them."""

    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.9, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=-1)
    stop: list[str] = Field(default_factory=list)


class RoleSpec(_Strict):
    """How one role is served: which weights, which sampling defaults."""

    model: str | None = None
    """A separate model (path relative to the manifest, or HF id) for this role; None = base."""
    adapter: str | None = None
    """A LoRA adapter folder (relative to the manifest) applied on the role's model; None = none."""
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)


class TemplateSpec(_Strict):
    layout: Literal["auto", "chat", "plain"] = "auto"
    follower_instruction: str = Field(DEFAULT_FOLLOWER_INSTRUCTION, min_length=1)
    plain_separator: str = Field(DEFAULT_PLAIN_SEPARATOR, min_length=1)
    bos: Literal["ensure", "as_rendered"] = "as_rendered"
    """The BOS rule the weights were trained with (``TemplateConfig.bos``). Absent: what
    ``slhf train`` wrote before the field existed (``as_rendered``); ``slhf train`` now writes
    ``ensure``, and a folder without a manifest is served with ``ensure`` (the paper's)."""

    def to_config(self) -> TemplateConfig:
        return TemplateConfig(
            follower_instruction=self.follower_instruction,
            layout=self.layout,
            plain_separator=self.plain_separator,
            bos=self.bos,
        )


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    base_model: str = "."
    leader: RoleSpec = Field(default_factory=RoleSpec)
    follower: RoleSpec = Field(default_factory=RoleSpec)
    template: TemplateSpec = Field(default_factory=TemplateSpec)
    default_rounds: int = Field(2, ge=0, le=64)
    max_model_len: int | None = Field(None, ge=16)
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported; this version of slhf "
                f"reads format_version {FORMAT_VERSION}"
            )
        if self.topology == "separate" and (self.leader.adapter or self.follower.adapter):
            raise ValueError("adapters with separate role models are not supported; merge them")
        return self

    # -- derived ----------------------------------------------------------------------------
    @property
    def topology(self) -> Topology:
        base = self.base_model
        if any(r.model not in (None, base) for r in (self.leader, self.follower)):
            return "separate"
        if self.leader.adapter or self.follower.adapter:
            return "lora"
        return "shared"

    def role(self, role: str) -> RoleSpec:
        if role == "leader":
            return self.leader
        if role == "follower":
            return self.follower
        raise KeyError(role)

    # -- io ---------------------------------------------------------------------------------
    @classmethod
    def for_plain_model(cls, name: str, base_model: str = ".") -> Manifest:
        """The manifest of a model folder or HF id that has none: topology "shared"."""
        return cls(
            name=name,
            base_model=base_model,
            template=TemplateSpec(bos="ensure"),  # the paper's released models: BOS once
            provenance={"producer": "implicit"},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and validate ``path`` (the file, or a folder holding ``slhf.json``)."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_FILE
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{p}: no manifest file") from None
        except json.JSONDecodeError as e:
            raise ManifestError(
                f"{p}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
            ) from None
        return cls.from_dict(raw, source=str(p))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "manifest") -> Manifest:
        if not isinstance(raw, dict):
            raise ManifestError(f"{source}: the manifest must be a JSON object")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}"
                for err in e.errors()
            )
            raise ManifestError(f"{source}: invalid manifest: {problems}") from None

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``slhf.json`` into ``folder`` atomically and return its path."""
        out = Path(folder) / MANIFEST_FILE
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.model_dump(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        return out

    def resolve(self, ref: str | None, folder: str | os.PathLike[str]) -> str | None:
        """Turn a manifest reference (relative path or HF id) into a local path or an HF id."""
        if ref is None:
            return None
        candidate = (Path(folder) / ref).resolve()
        if candidate.exists():
            return str(candidate)
        if ref.startswith((".", "/")):
            raise ManifestError(f"{folder}/{MANIFEST_FILE}: {ref!r} does not exist ({candidate})")
        return ref  # an HF id
