"""What the serving benchmarks share: the prompts, a percentile, and starting ``slhf serve``
(with the launcher every real-server run uses, ``slhf.launcher``).

Scripts run as ``python bench/NAME.py`` and import it as ``bench.common`` (the dev install puts the
repository root on the path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from slhf.launcher import ServerProcess

REPO = Path(__file__).resolve().parents[1]

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
    from slhf_models.tiny import random_model_dir

    return random_model_dir()


def in_process_job(service: Any, body: dict[str, Any]) -> Any:
    """The ``RefineJob`` our server would run for the ``/v1/refine`` ``body`` (its pipeline's
    plan), for the in-process chain on ``service`` (a ``slhf_server.service.Service``)."""
    from slhf_server.plan import plan_refine
    from slhf_server.protocol import RefineRequest

    return plan_refine(service, RefineRequest(**body)).jobs[0]


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def start_slhf(**settings: str) -> ServerProcess:
    """``slhf serve`` on a free loopback port, ready: this process's environment (``SLHF_*``
    included), quiet logs, then ``settings`` (SLHF_* names). The model defaults to
    ``bench_model_dir()``. Its output goes to a log file in the temporary directory (printed);
    leaving a ``with`` block on the result stops it."""
    settings.setdefault("SLHF_MODEL", str(bench_model_dir()))
    env = {**os.environ, "SLHF_LOG_LEVEL": "warning"}
    server = ServerProcess.start(env=env, cwd=REPO, **settings)
    print(f"slhf serve at {server.url}, log {server.log}", file=sys.stderr, flush=True)
    return server
