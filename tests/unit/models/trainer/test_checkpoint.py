"""A trainer killed while saving leaves a ``.tmp-step-*`` folder; the next run removes it when it
resumes or first saves (docs/reliability.md). The kill is real: a child process dies with
``os._exit`` in the middle of a save, so no ``except``/``finally`` of the save runs (as with
``kill -9``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from slhf_models.trainer.checkpoint import (
    CHECKPOINTS,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[4]

DIE_WHILE_SAVING = """
import os, sys
from pathlib import Path
import torch
from slhf_models.trainer import checkpoint

real_save = torch.save
def save_then_die(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if Path(path).name == "optimizer.pt":
        os._exit(9)  # like kill -9: no cleanup runs
checkpoint.torch.save = save_then_die
out = Path(sys.argv[1])
checkpoint.save_checkpoint(out, int(sys.argv[2]), params={"w": torch.zeros(4)},
                           optimizer={"state": {}}, state={"data_position": 0})
"""


def save(out: Path, step: int) -> Path:
    return save_checkpoint(
        out, step, params={"w": torch.zeros(4)}, optimizer={"s": 1}, state={"data_position": 3}
    )


def kill_while_saving(out: Path, step: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DIE_WHILE_SAVING, str(out), str(step)],
        cwd=REPO,
        timeout=120,
        capture_output=True,
    )
    assert proc.returncode == 9, proc.stderr.decode()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / CHECKPOINTS).iterdir() if p.name.startswith(".tmp-"))


def test_a_resumed_run_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    save(tmp_path, 2)
    kill_while_saving(tmp_path, 4)
    kill_while_saving(tmp_path, 4)
    assert len(leftovers(tmp_path)) == 1  # the second save removed the first one's leftover
    assert resolve_checkpoint("latest", tmp_path).name == "step-2"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step-2"]


def test_the_first_save_of_a_new_run_removes_them(tmp_path: Path) -> None:
    kill_while_saving(tmp_path, 1)
    assert len(leftovers(tmp_path)) == 1
    save(tmp_path, 1)
    assert leftovers(tmp_path) == []
    assert (tmp_path / CHECKPOINTS / "step-1" / "state.json").exists()


def test_removal_leaves_checkpoints_and_other_files_alone(tmp_path: Path) -> None:
    save(tmp_path, 1)
    root = tmp_path / CHECKPOINTS
    (root / "notes.txt").write_text("keep me")
    (root / ".tmp-step-9-abc").mkdir()
    assert remove_stale_temporaries(tmp_path) == [root / ".tmp-step-9-abc"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-1"]
    assert remove_stale_temporaries(tmp_path / "nowhere") == []
