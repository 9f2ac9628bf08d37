"""What the serving benchmarks share: the prompts, a percentile, and starting ``slhf serve``.

Scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path`` and they import it as
``common``; it puts the repository on ``sys.path`` for their ``server`` / ``models`` imports.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS = [
    "Explain gravity",
    "Describe the sea",
    "Why is the sky blue?",
    "Name three colors",
    "How do trees grow?",
    "What is a prime number?",
    "Tell me about rain",
]


def bench_model_dir() -> Path:
    """The benchmarks' model: the random tiny llama (``random_model_dir``). It rarely stops, so
    every request generates its full ``max_tokens`` (the shipped demo model answers in a dozen
    tokens); the server and the in-process chain must both use it."""
    from slhf.models.tiny import random_model_dir

    return random_model_dir()


def in_process_job(service: Any, body: dict[str, Any], i: int, k: int) -> Any:
    """The ``RefineJob`` our server would run for ``body`` (k rounds, early stop off), for the
    in-process chain on ``service`` (a ``slhf.server.service.Service``)."""
    from slhf.server.protocol import RefineRequest
    from slhf.server.refine import RefineJob

    request = RefineRequest(**body)
    return RefineJob(
        request_id=f"b{k}-{i}-{time.monotonic_ns()}",
        prompt=request.prompt or "",
        rounds=k,
        leader=service.generation_params("leader", request.leader, request.seed),
        follower=service.generation_params("follower", request.follower, request.seed),
        stop_when_unchanged=False,
    )


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], url: str) -> float:
    """Seconds until ``url`` answers 200; exits if the server process dies first."""
    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


def start_slhf(port: int, **settings: str) -> tuple[subprocess.Popen[bytes], str]:
    """``slhf serve`` on loopback with quiet logs and ``settings`` (SLHF_* names) on top.

    The model defaults to ``bench_model_dir()``."""
    settings.setdefault("SLHF_MODEL", str(bench_model_dir()))
    env = {
        **os.environ,
        "SLHF_HOST": "127.0.0.1",
        "SLHF_PORT": str(port),
        "SLHF_LOG_LEVEL": "warning",
        **settings,
    }
    proc = subprocess.Popen([sys.executable, "-m", "slhf.cli", "serve"], cwd=REPO, env=env)
    return proc, f"http://127.0.0.1:{port}"
