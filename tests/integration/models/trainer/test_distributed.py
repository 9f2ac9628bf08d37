"""Two CPU processes (gloo) train 2 steps through ``slhf_models.trainer.cli`` under torchrun.

``accelerate launch --num_processes 2 --cpu`` needs MPI on CPU; torchrun is what accelerate
itself uses on GPUs, and ``ACCELERATE_USE_CPU=1`` makes the Accelerator pick gloo on CPU.
About 30-60 s on a 2-core machine (two processes import torch and transformers).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slhf_models.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[4]
PROMPTS = ["What is the map?", "Tell me about the river.", "Why does it rain?", "Name a tree."]


def longer_wins(x: Any, a: str, b: str) -> float:
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_cpu_processes_split_the_global_batch_and_only_the_main_one_writes(
    tmp_path: Path,
) -> None:
    tiny = build_tiny_model(tmp_path / "tiny", seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model: {tiny}\ndataset: {prompts}\noutput_dir: {tmp_path / 'run'}\n"
        "batch_size: 2\nmax_new_tokens: 8\nsteps: 2\nlora_r: 4\nlearning_rate: 1e-2\n"
        "preference: callable:tests.integration.models.trainer.test_distributed:longer_wins\n"
    )
    # torchrun (what accelerate uses on GPUs); `accelerate launch --cpu` needs MPI for 2 processes
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), "-m", "slhf_models.trainer.cli", str(config)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    t0 = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]  # one writer: the main process
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert lines[0]["prompts_per_s"] > 0
    state = json.loads((tmp_path / "run/checkpoints/step-2/state.json").read_text())
    assert state["num_processes"] == 2 and state["data_position"] == 8  # 2 steps × 2 × 2
    rngs = torch.load(tmp_path / "run/checkpoints/step-2/rng_processes.pt", weights_only=False)
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert (tmp_path / "run" / "final" / "slhf.json").exists()
