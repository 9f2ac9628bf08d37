"""The server's overhead: a k-round ``/v1/refine`` over HTTP vs the same k+1 generations in-process.

Measures, in one run on one machine and model:
1. engine start time (in-process ``VllmEngine.start``) and server start time (process to /ready);
2. ``/v1/refine`` latency for rounds k = 0..3 at concurrency 1 (sequential requests);
3. the same refinement chain run directly on an in-process engine (our ``Refiner`` on
   ``VllmEngine``: the same templates, token ids, seeds and sampling; no HTTP, no FastAPI);
4. the ratio HTTP / in-process per k (1.00 = no overhead).

Both engines run at once and every request goes to both sides back to back (alternating which
goes first), so drift in the machine's load hits both alike. Engines run in one process each
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set below) so the idle side does not busy-poll a core.
Both sides get identical requests (same prompts, same per-request seeds, early stop off), so they
generate the same tokens. Run: ``.venv/bin/python bench/serve_overhead.py [--requests 20]``.
Writes ``bench/results/serve_overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench.common import PROMPTS, REPO, bench_model_dir, in_process_job, pct, start_slhf

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def request_body(i: int, rounds: int, max_tokens: int) -> dict:
    sp = {"max_tokens": max_tokens}
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "rounds": rounds,
        "seed": 1000 + i,
        "stop_when_unchanged": False,
        "leader": sp,
        "follower": sp,
    }


async def measure(args: argparse.Namespace, url: str) -> dict:
    """Paired measurement: request i goes to both sides, alternating which goes first."""
    import httpx

    from slhf_server.app import resolve_served_weights
    from slhf_server.service import Service
    from slhf_server.settings import ServerSettings
    from slhf_server.vllm_engine import VllmEngine

    settings = ServerSettings(model=str(bench_model_dir()), max_model_len=args.max_model_len)
    weights = resolve_served_weights(settings)
    engine = VllmEngine.start(weights, settings)
    service = Service.build(settings, weights, engine)

    async def direct(i: int, k: int) -> float:
        job = in_process_job(service, request_body(i, k, args.max_tokens))
        t0 = time.perf_counter()
        await service.refiner.refine(job)
        return (time.perf_counter() - t0) * 1000

    async def http(client: httpx.AsyncClient, i: int, k: int) -> float:
        t0 = time.perf_counter()
        r = await client.post("/v1/refine", json=request_body(i, k, args.max_tokens))
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    result: dict = {"engine_start_s": engine.startup_seconds, "direct": {}, "http": {}}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for i in range(args.warmup):
            await direct(i, 1)
            await http(client, i, 1)
        for k in args.rounds:
            d, h = [], []
            for i in range(args.requests):
                if i % 2:
                    d.append(await direct(i, k))
                    h.append(await http(client, i, k))
                else:
                    h.append(await http(client, i, k))
                    d.append(await direct(i, k))
            result["direct"][k], result["http"][k] = d, h
    await engine.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20, help="requests per k (sequential)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_overhead.json")
    args = ap.parse_args()

    with start_slhf(SLHF_MAX_MODEL_LEN=str(args.max_model_len)) as server:
        res = asyncio.run(measure(args, server.url))
    ready_s = server.startup_s
    rows = []
    print(
        f"server process to /ready: {ready_s:.1f} s; "
        f"engine start (in-process): {res['engine_start_s']:.1f} s"
    )
    print(
        f"{'k':>2} {'in-process p50 ms':>18} {'HTTP p50 ms':>12} {'HTTP p99 ms':>12} "
        f"{'ratio p50':>10}"
    )
    for k in args.rounds:
        d, h = res["direct"][k], res["http"][k]
        row = {
            "rounds": k,
            "generations": k + 1,
            "in_process_p50_ms": statistics.median(d),
            "in_process_p99_ms": pct(d, 0.99),
            "http_p50_ms": statistics.median(h),
            "http_p99_ms": pct(h, 0.99),
            "ratio_p50": statistics.median(h) / statistics.median(d),
            "ratio_mean": statistics.fmean(h) / statistics.fmean(d),
            "ratio_paired_median": statistics.median(x / y for x, y in zip(h, d, strict=True)),
        }
        rows.append(row)
        print(
            f"{k:>2} {row['in_process_p50_ms']:>18.1f} {row['http_p50_ms']:>12.1f} "
            f"{row['http_p99_ms']:>12.1f} {row['ratio_p50']:>10.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "serve_overhead",
                "command": " ".join(sys.argv),
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "settings": {
                    "requests": args.requests,
                    "max_tokens": args.max_tokens,
                    "concurrency": 1,
                    "vllm_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),
                },
                "engine_start_s": res["engine_start_s"],
                "server_ready_s": ready_s,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
