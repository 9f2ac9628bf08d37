"""Follower-round wall time with and without drafting (``SLHF_SPECULATIVE``), docs/performance.md.

One Follower round per request: ``/v1/refine`` with ``response`` (a clean answer of the Condorcet
task in one of its three styles, cycling) and ``rounds: 1`` on the shipped demo model, whose
Follower copies the answer's content and changes its frame (docs/demo.md): the case drafting
from the prompt is for. Every request samples as the model's manifest says (temperature 0.9,
``top_k`` 50), or greedily with ``--temperature 0``.
Each setting is a fresh ``slhf serve`` measured alone (the script checks
that no other engine or server runs), warmed up, then ``--requests`` requests at each
concurrency, the same prompts, answers and seeds for every setting::

    python bench/drafting.py --settings off ngram --concurrency 1 8 32 --requests 96 \
        --out bench/results/drafting

``--model`` serves another folder, e.g. the copy-heavy Follower of ``bench/copy_model.py``
(``make bench`` runs both, with ``--server-autogroup-nice 10``).

Reports per setting and concurrency: requests per second, the per-request latency (p50, p90),
completion tokens, and the share of draft tokens accepted (``usage.completion_tokens_details``);
then each drafted setting's ratio to ``off`` (p50 latency at c = 1, throughput at every c).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import pct, start_slhf
from bench.procs import others_running, set_autogroup_nice
from slhf_models.serving.loading import SHIPPED_MODEL_DIR
from slhf_models.tasks.condorcet import (
    DEMO_OBJECTS,
    STYLES,
    parse_prompt,
    render_answer,
    sample_prompts,
)


def workload(n: int, seed: int, temperature: float | None = None) -> list[dict[str, Any]]:
    """``n`` refine bodies: held-out prompts, a clean given answer in a cycling style."""
    follower: dict[str, Any] = {}  # the model's sampling (temperature 0.9, top_k 50)
    if temperature is not None:
        follower["temperature"] = temperature
    bodies = []
    for i, prompt in enumerate(sample_prompts(n, "test", seed=seed)):
        facts = parse_prompt(prompt)
        things = [(facts.adjective, o) for o in DEMO_OBJECTS[: facts.count]]
        answer = render_answer(STYLES[i % len(STYLES)], facts, things)
        bodies.append(
            {
                "prompt": prompt,
                "response": answer,
                "rounds": 1,
                "follower": follower,
                "stop_when_unchanged": False,
                "seed": seed + i,
            }
        )
    return bodies


async def run_cell(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Send ``bodies`` with at most ``concurrency`` in flight; latency and token figures."""
    latencies: list[float] = []
    tokens = accepted = rejected = copies = 0
    queue = list(bodies)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, accepted, rejected, copies
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/refine", json=body)
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            follower = r.json()["rounds"][0]
            copies += follower["text"].strip() == body["response"].strip()
            usage = follower["usage"]
            tokens += usage["completion_tokens"]
            details = usage.get("completion_tokens_details") or {}
            accepted += details.get("accepted_prediction_tokens", 0)
            rejected += details.get("rejected_prediction_tokens", 0)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    drafted = accepted + rejected
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(bodies) / wall, 2),
        "p50_ms": round(1000 * pct(latencies, 0.5), 1),
        "p90_ms": round(1000 * pct(latencies, 0.9), 1),
        "completion_tokens": tokens,
        "draft_tokens": drafted,
        "accepted_share": round(accepted / drafted, 3) if drafted else None,
        "verbatim_copies": round(copies / len(bodies), 3),
    }


def measure(setting: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    busy = others_running()
    if busy:
        raise SystemExit(f"not alone: {[b['cmdline'] for b in busy]}")
    env = {
        "SLHF_SPECULATIVE": setting,
        "SLHF_MODEL": args.model or str(SHIPPED_MODEL_DIR),
        "SLHF_MAX_INFLIGHT_GENERATIONS": "4096",
    }
    rows = []
    with start_slhf(**env) as server:
        if args.server_autogroup_nice is not None:
            print("server session:", set_autogroup_nice(server.pid, args.server_autogroup_nice))
        asyncio.run(
            run_cell(server.url, workload(16, args.seed + 1000, args.temperature), 4)
        )  # warm-up
        for c in args.concurrency:
            row = asyncio.run(
                run_cell(server.url, workload(args.requests, args.seed, args.temperature), c)
            )
            row["setting"] = setting
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["concurrency"]: r for r in rows if r["setting"] == "off"}
    out = [
        "| setting | c | req/s | p50 ms | p90 ms | tokens/request | copies | drafts accepted | "
        "p50 vs off | req/s vs off |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r["concurrency"])
        p50 = f"{r['p50_ms'] / b['p50_ms']:.2f}×" if b else "–"
        rps = f"{r['req_per_s'] / b['req_per_s']:.2f}×" if b else "–"
        share = "–" if r["accepted_share"] is None else f"{r['accepted_share']:.0%}"
        out.append(
            f"| {r['setting']} | {r['concurrency']} | {r['req_per_s']} | {r['p50_ms']} | "
            f"{r['p90_ms']} | {r['completion_tokens'] / r['requests']:.1f} | "
            f"{r['verbatim_copies']:.0%} | {share} | "
            f"{p50} | {rps} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["off", "ngram"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--temperature", type=float, help="Follower temperature (default: the model's)"
    )
    parser.add_argument("--model", help="weights folder (default: the shipped demo model)")
    parser.add_argument(
        "--server-autogroup-nice",
        type=int,
        help="autogroup niceness of the server's session, so that this load generator is not "
        "starved of CPU (bench/serving.py's option; docs/performance.md)",
    )
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    if "off" not in args.settings:
        args.settings.insert(0, "off")
    rows = [row for s in args.settings for row in measure(s, args)]
    md = table(rows)
    print(md)
    if args.out:
        record = {
            "command": "python bench/drafting.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()} {platform.platform()}, {os.cpu_count()} CPUs",
            "model": args.model
            or "models/slhf_models/weights/slhf-condorcet-tiny (shipped default)",
            "temperature": args.temperature,
            "server_autogroup_nice": args.server_autogroup_nice,
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(
            f"`{record['command']}` on {record['machine']}, each setting alone.\n\n{md}\n"
        )


if __name__ == "__main__":
    main()
