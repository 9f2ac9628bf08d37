"""Two CPU processes (gloo) train 2 steps through ``slhf_models.trainer.cli`` under torchrun.

``accelerate launch --num_processes 2 --cpu`` needs MPI on CPU; torchrun is what accelerate
itself uses on GPUs, and ``ACCELERATE_USE_CPU=1`` makes the Accelerator pick gloo on CPU.
About 30-60 s on a 2-core machine (two processes import torch and transformers).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from slhf_models.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[4]
PROMPTS = ["What is the map?", "Tell me about the river.", "Why does it rain?", "Name a tree."]


def longer_wins(x: Any, a: str, b: str) -> float:
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


def run_config(folder: Path, settings: str) -> Path:
    """A train.yaml on a fresh tiny model and PROMPTS, plus ``settings`` (YAML lines)."""
    tiny = build_tiny_model(folder / "tiny", seed=0)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = folder / "train.yaml"
    config.write_text(
        f"model: {tiny}\ndataset: {prompts}\nbatch_size: 2\nlora_r: 4\nlearning_rate: 1e-2\n"
        "preference: callable:tests.integration.models.trainer.test_distributed:longer_wins\n"
        + settings
    )
    return config


def torchrun(config: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Two processes of ``slhf_models.trainer.cli`` under torchrun (what accelerate uses on GPUs;
    `accelerate launch --cpu` needs MPI for 2 processes) with ``env`` over the tests' own."""
    # --standalone: the rendezvous takes a port the OS assigns (no chosen port to race for)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    command += ["2", "-m", "slhf_models.trainer.cli", str(config)]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return subprocess.run(
        [*command, *overrides],
        cwd=REPO,
        env=base | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_two_cpu_processes_split_the_global_batch_and_only_the_main_one_writes(
    tmp_path: Path,
) -> None:
    config = run_config(tmp_path, f"output_dir: {tmp_path / 'run'}\nmax_new_tokens: 8\nsteps: 2\n")
    t0 = time.monotonic()
    done = torchrun(config, ACCELERATE_USE_CPU="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]  # one writer: the main process
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert lines[0]["prompts_per_s"] > 0
    state = json.loads((tmp_path / "run/checkpoints/step-2/state.json").read_text())
    # 2 steps × 2 processes × batch 2, and the next batch whose Leader answers step 2 sampled
    assert state["num_processes"] == 2 and state["data_position"] == 12
    pending = torch.load(tmp_path / "run/checkpoints/step-2/pending.pt", weights_only=True)
    assert len(pending) == 2 and pending[0]["prompts"] != pending[1]["prompts"]  # its own slice
    assert state["distributed"] == "ddp"
    rngs = torch.load(tmp_path / "run/checkpoints/step-2/rng_processes.pt", weights_only=False)
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert (tmp_path / "run" / "final" / "slhf.json").exists()


# -- FSDP2 on two CPU processes -------------------------------------------------------------------
def _metrics(run: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    timing = ("time_s", "steps_per_s", "prompts_per_s")
    return [{k: v for k, v in m.items() if k not in timing} for m in lines]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = [
        *folder.glob("model.safetensors"),
        *folder.glob("adapters/adapter_model.safetensors"),
    ]
    return load_file(path)


@pytest.mark.parametrize("use_lora", [False, True])
def test_fsdp2_on_two_cpu_processes_shards_and_resumes_exactly(
    tmp_path: Path, use_lora: bool
) -> None:
    """Under accelerate's FSDP environment (what `accelerate launch --config_file
    recipes/accelerate/fsdp.yaml` sets) two gloo processes shard the policy (and a full
    fine-tune's reference) with FSDP2; 2 steps + resume_from=latest + 2 steps equal 4 steps."""
    config = run_config(
        tmp_path,
        f"use_lora: {str(use_lora).lower()}\nmax_new_tokens: 6\nsave_every: 2\n"
        "gradient_accumulation_steps: 2\nbaseline: leave_one_out\nmax_grad_norm: 0.5\n",
    )
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what fsdp.yaml's launch sets
    whole, split = tmp_path / "whole", tmp_path / "split"
    for overrides in (
        ("steps=4", f"output_dir={whole}"),
        ("steps=2", f"output_dir={split}"),
        ("steps=4", f"output_dir={split}", "resume_from=latest"),
    ):
        done = torchrun(config, *overrides, **fsdp)
        assert done.returncode == 0, done.stderr[-4000:]

    state = json.loads((split / "checkpoints/step-2/state.json").read_text())
    assert state["distributed"] == "fsdp2" and state["num_processes"] == 2
    shards = sorted(p.name for p in (split / "checkpoints/step-2/sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shards
    assert not (split / "checkpoints/step-2/params.pt").exists()

    a, b = _metrics(whole), _metrics(split)
    assert [m["step"] for m in a] == [1, 2, 3, 4] and [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    assert all(m["grad_norm"] > 0 for m in a)

    final_a, final_b = _weights(whole / "final"), _weights(split / "final")
    assert final_a.keys() == final_b.keys()
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor)
    if not use_lora:
        start = _weights(tmp_path / "tiny")
        moved = [n for n in start if not torch.equal(start[n], final_a[n].to(start[n].dtype))]
        assert len(moved) > len(start) // 2  # the final weights are the trained ones, gathered
    else:
        assert any(t.abs().sum() > 0 for n, t in final_a.items() if "lora_B" in n)
