"""Atomic, resumable checkpoints: ``output_dir/checkpoints/step-N/``.

A checkpoint holds the trainable parameters (LoRA adapters, or every weight in a full fine-tune),
the optimizer state, the RNG states (torch, Python, numpy) and ``state.json`` (step, data
position, config hash). It is written into a temporary sibling folder, every file fsync'ed, then
renamed into place with ``os.replace`` and the parent folder fsync'ed: a run killed mid-write
leaves the previous checkpoints intact and at most a ``.tmp-*`` folder, which is ignored.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not match the run."""


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    params: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write ``step-N`` atomically and return its path."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    try:
        torch.save(params, tmp / "params.pt")
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # re-saving the same step (a resumed run) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / CHECKPOINTS
    steps = [
        (int(m.group(1)), p)
        for p in (root.iterdir() if root.exists() else [])
        if (m := _STEP_DIR.match(p.name)) and (p / "state.json").exists()
    ]
    return max(steps)[1] if steps else None


def resolve_checkpoint(resume_from: str, output_dir: Path) -> Path:
    """``latest`` → the newest complete checkpoint in ``output_dir``; else the folder given."""
    if resume_from == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(f"resume_from: latest, but {output_dir / CHECKPOINTS} has none")
        return found
    path = Path(resume_from)
    if not (path / "state.json").exists():
        raise CheckpointError(f"resume_from: {path} is not a checkpoint (no state.json)")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's parts: ``params``, ``optimizer``, ``rng``, ``state``."""
    return {
        "params": torch.load(path / "params.pt", weights_only=True),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "rng": torch.load(path / "rng.pt", weights_only=False),  # python/numpy states
        "state": json.loads((path / "state.json").read_text()),
    }
