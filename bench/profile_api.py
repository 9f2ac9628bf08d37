"""Where our API process's own CPU goes, per function: ``slhf serve`` under cProfile, timed by
the CPU time of its event-loop thread (docs/performance.md, "The API process's CPU per chain").

py-spy (``bench/profile_serving.py``) samples threads that are running *or waiting for a CPU*,
so on a busy machine its shares of a process follow the run queue, not the work. cProfile with
``time.thread_time`` counts only the CPU the event-loop thread used -- the thread that runs the
HTTP stack, our pipeline and vLLM's ``AsyncLLM`` output handler -- whatever else runs; it slows
the process (about 2x here), so read shares, not milliseconds.

Starts ``slhf serve`` on the benchmarks' random tiny llama (as ``bench/serving.py`` starts
``ours``), warms it, profiles ``--requests`` chains of ``--k`` Follower rounds at concurrency
``--c`` on ``/v1/refine`` and writes OUT.json / OUT.md: the thread's CPU by package and the most
expensive functions (own time and time including callees), plus the profile itself (OUT.prof,
for ``python -m pstats``)::

    python bench/profile_api.py --k 2 --c 32 --requests 256 --out bench/results/profile_api
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.common import PROMPTS, REPO, bench_model_dir
from slhf.launcher import LOOPBACK, ServerProcess, free_port, serve_env

_PROFILE = cProfile.Profile(time.thread_time)


def _serve_profiled() -> int:
    """``slhf serve`` in this process; SIGUSR1 starts the profile, SIGUSR2 stops it and writes
    it to ``$SLHF_BENCH_PROFILE``."""

    def start(*_: Any) -> None:
        _PROFILE.enable()

    def stop(*_: Any) -> None:
        _PROFILE.disable()
        _PROFILE.dump_stats(os.environ["SLHF_BENCH_PROFILE"])

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from slhf import cli

    return cli.main(["serve"])


def _where(path: str) -> str:
    """A function's package: ``vllm/v1/engine``, ``prometheus_client``, ``slhf_server``..."""
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            parts = path.split(marker, 1)[1].split("/")
            return "/".join(parts[:3]) if parts[0] == "vllm" else parts[0]
    for pkg in ("slhf_server", "slhf_models", "slhf"):
        if f"/{pkg}/" in path:
            return pkg
    return path if path.startswith("<") or path == "~" else "other"


def summary(stats: pstats.Stats, top: int = 30) -> dict[str, Any]:
    """The profile's total, its own time by package, and the top functions by own and by
    cumulative time (seconds of the thread's CPU; shares of the total)."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    by_pkg: Counter[str] = Counter()
    rows = []
    for (path, line, name), (_, calls, own, cum, _) in raw.items():
        by_pkg["builtins" if path == "~" else _where(path)] += own
        where = path.split("site-packages/")[-1].removeprefix(f"{REPO}/")
        function = f"{name} ({where}:{line})"
        rows.append({"function": function, "calls": calls, "own": own, "cum": cum})

    def share(x: float) -> float:
        return round(x / total, 4) if total else 0.0

    return {
        "total_s": round(total, 3),
        "by_package": {k: share(v) for k, v in by_pkg.most_common(20)},
        "by_own_time": [
            {**r, "own": share(r["own"]), "cum": share(r["cum"])}
            for r in sorted(rows, key=lambda r: -r["own"])[:top]
        ],
        "by_cumulative_time": [
            {**r, "own": share(r["own"]), "cum": share(r["cum"])}
            for r in sorted(rows, key=lambda r: -r["cum"])[:top]
        ],
    }


async def drive(url: str, k: int, c: int, n: int) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    sampling = {"max_tokens": 32}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        gate = asyncio.Semaphore(c)

        async def one(i: int) -> None:
            body = {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "rounds": k,
                "stop_when_unchanged": False,
                "leader": sampling,
                "follower": sampling,
            }
            async with gate:
                r = await client.post("/v1/refine", json=body)
                if r.status_code != 200:
                    raise SystemExit(f"/v1/refine: {r.status_code} {r.text}")

        await asyncio.gather(*(one(i) for i in range(n)))


def table(s: dict[str, Any]) -> str:
    out = ["| package | share of own time |", "|---|---|"]
    out += [f"| {k} | {v:.1%} |" for k, v in s["by_package"].items()]
    for key, title in (("by_own_time", "own"), ("by_cumulative_time", "cumulative")):
        out += ["", f"By {title} time:", "", "| function | calls | own | cumulative |"]
        out += ["|---|---|---|---|"]
        out += [
            f"| `{r['function'][:100]}` | {r['calls']} | {r['own']:.1%} | {r['cum']:.1%} |"
            for r in s[key]
        ]
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:] == ["--serve-profiled"]:
        raise SystemExit(_serve_profiled())
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=2, help="Follower rounds")
    ap.add_argument("--c", type=int, default=32, help="requests in flight")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json, OUT.md, OUT.prof")
    args = ap.parse_args()
    port = free_port()
    prof = args.out.with_suffix(".prof").resolve()
    prof.parent.mkdir(parents=True, exist_ok=True)
    env = serve_env(
        port,
        {**os.environ, "SLHF_LOG_LEVEL": "warning"},
        SLHF_MODEL=str(bench_model_dir()),
        SLHF_MAX_MODEL_LEN="1024",
        SLHF_MAX_INFLIGHT_GENERATIONS=str(4 * args.c * (args.k + 1)),
        SLHF_LOG_FORMAT="text",
        SLHF_BENCH_PROFILE=str(prof),
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-profiled"]
    load = os.getloadavg()
    with ServerProcess.spawn(cmd, url=f"http://{LOOPBACK}:{port}", env=env, cwd=REPO) as server:
        asyncio.run(drive(server.url, args.k, args.c, 2 * args.c))  # warm-up
        proc = psutil.Process(server.pid)
        os.kill(server.pid, signal.SIGUSR1)
        t0, w0 = proc.cpu_times(), time.monotonic()
        asyncio.run(drive(server.url, args.k, args.c, args.requests))
        t1, wall = proc.cpu_times(), time.monotonic() - w0
        os.kill(server.pid, signal.SIGUSR2)
        for _ in range(100):
            if prof.exists() and prof.stat().st_size:
                break
            time.sleep(0.1)
        time.sleep(0.5)
    cpu = (t1.user + t1.system) - (t0.user + t0.system)
    s = summary(pstats.Stats(str(prof)))
    head = (
        f"`python bench/profile_api.py {' '.join(sys.argv[1:])}`: k = {args.k}, c = {args.c}, "
        f"{args.requests} chains in {wall:.1f} s ({args.requests / wall:.1f} req/s, profiled); "
        f"API process {1000 * cpu / args.requests:.2f} CPU ms per chain under the profiler; "
        f"event-loop thread {s['total_s']:.2f} CPU s profiled; load average before "
        f"{' '.join(f'{x:.2f}' for x in load)}"
    )
    record = {"command": head.split("`")[1], "load_average_before": load, "wall_s": wall}
    record |= {"api_cpu_ms_per_chain_profiled": 1000 * cpu / args.requests, **s}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(head + "\n\n" + table(s) + "\n")
    print(head + "\n\n" + table(s))


if __name__ == "__main__":
    main()
