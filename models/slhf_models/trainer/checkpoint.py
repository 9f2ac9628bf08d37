"""Atomic, resumable checkpoints: ``output_dir/checkpoints/step-N/``.

A checkpoint holds the trainable parameters (LoRA adapters, or every weight in a full fine-tune),
the optimizer state, the RNG states (torch, Python, numpy; every process's) and ``state.json``
(step, data position, config hash, number of processes and the distributed mode: ``none``,
``ddp`` or ``fsdp2``). Unsharded runs keep parameters and optimizer in ``params.pt`` and
``optimizer.pt``; a sharded (``fsdp2``) run keeps every process's shards of both in
``sharded/``, written by ``torch.distributed.checkpoint``. It is written into a temporary
sibling folder, every file fsync'ed, then
renamed into place with ``os.replace`` and the parent folder fsync'ed: a run killed mid-write
leaves the previous checkpoints intact and at most a ``.tmp-step-*`` folder, which is ignored,
and removed by ``remove_stale_temporaries`` when the next run resumes or first saves.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
PENDING = "pending.pt"  # each process's next batch and its sampled Leader answers (one_call)
SHARDED = "sharded"  # an fsdp2 run's parameters and optimizer state, every process's shards
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not match the run."""


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        # HF generate samples on the model's device: on a GPU that is the CUDA generator.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Remove the ``.tmp-step-*`` folders of saves that never finished (a run killed while
    saving); returns them. Only for the one process that saves, when it is not saving."""
    root = output_dir / CHECKPOINTS
    stale = sorted(p for p in root.glob(_TMP_PREFIX + "*") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def temporary_folder(output_dir: Path, step: int) -> Path:
    """A new ``.tmp-step-N-*`` folder for ``step``'s checkpoint (stale ones removed first): the
    main process makes it, every process of a sharded run writes its shards into it."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=root))


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    params: dict[str, torch.Tensor] | None = None,
    optimizer: dict[str, Any] | None = None,
    state: dict[str, Any],
    process_rngs: list[dict[str, Any]] | None = None,
    pending: list[dict[str, Any] | None] | None = None,
    tmp: Path | None = None,
) -> Path:
    """Write ``step-N`` atomically and return its path.

    ``params`` and ``optimizer``: an unsharded run's; a sharded run passes ``tmp``, the
    ``temporary_folder`` whose ``sharded/`` every process has written. ``process_rngs``: every
    process's RNG states (multi-process runs), in ``rng_processes.pt``; ``rng.pt`` always holds
    this (the main) process's states. ``pending``: every process's sampled but not yet trained
    Leader answers (the ``one_call`` rollout schedule), in ``pending.pt``.
    """
    root = output_dir / CHECKPOINTS
    final = root / f"step-{step}"
    tmp = tmp or temporary_folder(output_dir, step)
    try:
        if params is not None:
            torch.save(params, tmp / "params.pt")
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if process_rngs is not None:
            torch.save(process_rngs, tmp / "rng_processes.pt")
        if pending is not None and any(p is not None for p in pending):
            torch.save(pending, tmp / PENDING)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if final.exists():  # re-saving the same step (a resumed run) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_pending(path: Path, rank: int) -> dict[str, Any] | None:
    """This process's pending Leader answers in checkpoint ``path`` (None: there are none)."""
    file = path / PENDING
    if not file.exists():
        return None
    per_process = torch.load(file, weights_only=True)
    return per_process[rank] if rank < len(per_process) else None


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / CHECKPOINTS
    steps = [
        (int(m.group(1)), p)
        for p in (root.iterdir() if root.exists() else [])
        if (m := _STEP_DIR.match(p.name)) and (p / "state.json").exists()
    ]
    return max(steps)[1] if steps else None


def resolve_checkpoint(resume_from: str, output_dir: Path) -> Path:
    """``latest`` → the newest complete checkpoint in ``output_dir``; else the folder given.
    Called when a run resumes: the leftovers of a save killed midway are removed first."""
    remove_stale_temporaries(output_dir)
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
    """The checkpoint's parts: ``params``, ``optimizer`` (None in a sharded checkpoint), ``rng``,
    ``state``, ``process_rngs``."""
    per_process = path / "rng_processes.pt"
    unsharded = (path / "params.pt").exists()
    return {
        "process_rngs": torch.load(per_process, weights_only=False)
        if per_process.exists()
        else None,
        "params": torch.load(path / "params.pt", weights_only=True) if unsharded else None,
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True) if unsharded else None,
        "rng": torch.load(path / "rng.pt", weights_only=False),  # python/numpy states
        "state": json.loads((path / "state.json").read_text()),
    }


def saved_mode(state: dict[str, Any]) -> str:
    """The distributed mode a checkpoint was written in (older ones: from the process count)."""
    return str(state.get("distributed") or ("ddp" if state.get("num_processes", 1) > 1 else "none"))


def restore_checkpoint(
    path: Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: Any,
    *,
    rank: int = 0,
    num_processes: int = 1,
    mode: str = "none",
    load_shards: Callable[[Path], None] | None = None,
) -> tuple[int, int]:
    """Load ``path`` into ``params``, ``optimizer`` and this process's RNGs.

    Returns ``(step, data_position)``. The run must have the same trainable parameters, the same
    number of processes (``batch_size`` is per process, so the data stream depends on it) and the
    same distributed mode. A sharded run gives ``load_shards``, which loads ``sharded/`` into
    its parameters and optimizer (a collective).
    """
    ckpt = load_checkpoint(path)
    written = saved_mode(ckpt["state"])
    if (written == "fsdp2") != (mode == "fsdp2"):
        raise CheckpointError(
            f"{path} was written by a {written} run; this run is {mode}. Resume under the same "
            "launch configuration (a sharded checkpoint holds each process's shards)"
        )
    saved = ckpt["state"].get("num_processes", 1)
    if saved != num_processes:
        raise CheckpointError(
            f"{path} was written by {saved} process(es); this run has {num_processes}. "
            "Resume with the same number of processes (batch_size is per process)"
        )
    if ckpt["params"] is None:
        if load_shards is None:
            raise CheckpointError(f"{path} holds sharded weights; it needs an fsdp2 run")
        load_shards(path / SHARDED)
        rngs = ckpt["process_rngs"]
        set_rng_state(rngs[rank] if rngs else ckpt["rng"])
        return int(ckpt["state"]["step"]), int(ckpt["state"]["data_position"])
    missing = set(params) - set(ckpt["params"])
    if missing:
        raise CheckpointError(
            f"{path}: lacks {len(missing)} trainable parameters (e.g. {sorted(missing)[0]}); "
            "was it written with another use_lora/follower_weights/lora_* setting?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(ckpt["params"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    rngs = ckpt["process_rngs"]
    set_rng_state(rngs[rank] if rngs else ckpt["rng"])
    return int(ckpt["state"]["step"]), int(ckpt["state"]["data_position"])
