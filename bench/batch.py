"""Offline batch throughput: ``slhf batch`` vs our server over HTTP vs the bare in-process chain.

Every system answers the same rows, one system after another (never at once), on the shipped
demo model with the same settings: ``/v1/chat/completions`` bodies, one user prompt each, k
Follower rounds (early stop off, so every row is exactly k + 1 generations), ``max_tokens`` per
generation and the row's index as its seed (the same tokens whatever system answers).

1. ``batch``: the real command, ``python -m slhf.cli batch ROWS.jsonl -o OUT.jsonl
   --concurrency C`` (its own default C unless ``--batch-concurrency`` says otherwise); rows/s
   is the command's own figure (rows written / seconds from the first row to the last, the engine's
   load excluded), and the output is checked: every row a 200.
2. ``server``: ``slhf serve`` (admission out of the way), warmed up, then an HTTP client (httpx)
   posting the same bodies with at most c in flight, for each c of ``--server-concurrency``; the
   best c is the server's figure.
3. ``bare``: ``VllmEngine`` + ``Service`` in this process, with the settings ``slhf batch`` runs
   with, each row planned before the clock starts and its choices run straight on the
   ``Refiner`` (no route, no admission, no response shaping), with the batch's concurrency: the
   ceiling of a batch over the same engine. ``bare_planned``: the same on a fresh engine (so no
   prefix cache is left from ``bare``), each row's body validated and planned within the clock,
   as any caller of the chain must.

Goals: batch >= 1.0x the server at its best concurrency, >= 0.9x the bare chain. The machine's
load averages are recorded before and after each system; measure alone (other benchmarks and
test runs skew every figure).

Run: ``.venv/bin/python bench/batch.py`` (about 4 minutes on 2 cores). Writes
``bench/results/batch.json`` and ``batch.md`` (``--out`` names another json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import PROMPTS, REPO, start_slhf

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
RESULTS = REPO / "bench" / "results"
_SUMMARY = re.compile(
    r"slhf batch: (\d+) written \((\d+) errors\).*?; ([\d.]+) rows/s, (\d+) tokens/s"
)


def bodies(rows: int, rounds: int, max_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}],
            "max_tokens": max_tokens,
            "seed": i,
            "refinement": {"rounds": rounds, "stop_when_unchanged": False},
        }
        for i in range(rows)
    ]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- systems ------------------------------------------------------------------------------------
def run_batch_cli(rows: list[dict[str, Any]], concurrency: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="slhf-bench-batch-") as tmp:
        inp, out = Path(tmp) / "rows.jsonl", Path(tmp) / "out.jsonl"
        with inp.open("w") as f:
            for i, body in enumerate(rows):
                line = {"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions"}
                f.write(json.dumps({**line, "body": body}) + "\n")
        cmd = [sys.executable, "-m", "slhf.cli", "batch", str(inp), "-o", str(out)]
        cmd += [] if concurrency is None else ["--concurrency", str(concurrency)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"slhf batch failed ({done.returncode}):\n{done.stderr[-3000:]}")
        m = _SUMMARY.search(done.stderr)
        if m is None:
            raise SystemExit(f"no summary line from slhf batch:\n{done.stderr[-3000:]}")
        records = [json.loads(x) for x in out.read_text().splitlines()]
    bad = [r for r in records if (r["response"] or {}).get("status_code") != 200]
    if len(records) != len(rows) or bad or int(m.group(2)):
        raise SystemExit(f"slhf batch: {len(records)} lines for {len(rows)} rows, {len(bad)} bad")
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in records)
    return {
        "rows_per_s": float(m.group(3)),
        "tokens": tokens,
        "concurrency": concurrency,
        "command_wall_s": round(wall, 1),
    }


async def _drive(url: str, rows: list[dict[str, Any]], concurrency: int) -> tuple[float, int]:
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(body: dict[str, Any]) -> int:
            async with slots:
                r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise SystemExit(f"server answered {r.status_code}: {r.text[:500]}")
            return int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(b) for b in rows))
        return time.perf_counter() - t0, sum(tokens)


def run_server(
    rows: list[dict[str, Any]], warmup: list[dict[str, Any]], concurrencies: list[int]
) -> dict[str, Any]:
    bound = max(concurrencies) * 2 * (rows[0]["refinement"]["rounds"] + 1)
    cells = []
    with start_slhf(
        SLHF_MODEL="", SLHF_MAX_INFLIGHT_GENERATIONS=str(bound), SLHF_LOG_FORMAT="text"
    ) as server:
        asyncio.run(_drive(server.url, warmup, max(concurrencies)))
        for c in concurrencies:
            before = load()
            try:
                seconds, tokens = asyncio.run(_drive(server.url, rows, c))
            except httpx.TransportError as e:  # recorded, not retried: the cell is void
                cells.append({"concurrency": c, "error": f"{type(e).__name__}: {e}"})
                print(f"  server c={c}: {cells[-1]['error']}", file=sys.stderr, flush=True)
                continue
            cell = {"concurrency": c, "rows_per_s": round(len(rows) / seconds, 2)}
            cells.append({**cell, "tokens": tokens, "load_before": before, "load_after": load()})
            print(f"  server c={c}: {cell['rows_per_s']} rows/s", file=sys.stderr, flush=True)
    measured = [x for x in cells if "rows_per_s" in x]
    if not measured:
        raise SystemExit("server: no concurrency could be measured")
    best = max(measured, key=lambda x: x["rows_per_s"])
    return {
        "rows_per_s": best["rows_per_s"],
        "best_concurrency": best["concurrency"],
        "tokens": best["tokens"],
        "cells": cells,
    }


async def _bare(
    rows: list[dict[str, Any]],
    warmup: list[dict[str, Any]],
    concurrency: int,
    plan_in_clock: bool = False,
) -> dict[str, Any]:
    from slhf_server.app import resolve_served_weights
    from slhf_server.lifecycle import frozen_startup_heap
    from slhf_server.openai_protocol import ChatCompletionRequest
    from slhf_server.pipeline import run_jobs
    from slhf_server.plan import plan_chat
    from slhf_server.service import Service
    from slhf_server.settings import ServerSettings
    from slhf_server.vllm_engine import VllmEngine

    # the settings slhf batch runs with (no vLLM stat logger: nothing scrapes a batch)
    settings = ServerSettings(log_format="text", log_level="warning", engine_metrics=False)
    weights = resolve_served_weights(settings)
    engine = VllmEngine.start(weights, settings)
    service = Service.build(settings, weights, engine)
    slots = asyncio.Semaphore(concurrency)

    async def one(jobs: Any) -> int:
        async with slots:
            outcomes = await run_jobs(service.refiner, jobs)
        return sum(o.usage.completion_tokens for o in outcomes)

    def plans(bodies: list[dict[str, Any]]) -> list[Any]:
        return [plan_chat(service, ChatCompletionRequest.model_validate(b)).jobs for b in bodies]

    async def planned_now(body: dict[str, Any]) -> int:
        async with slots:
            jobs = plans([body])[0]
            outcomes = await run_jobs(service.refiner, jobs)
        return sum(o.usage.completion_tokens for o in outcomes)

    try:
        with frozen_startup_heap():  # as slhf batch and slhf serve run
            await asyncio.gather(*(one(j) for j in plans(warmup)))
            if plan_in_clock:
                t0 = time.perf_counter()
                tokens = await asyncio.gather(*(planned_now(b) for b in rows))
            else:
                planned = plans(rows)
                t0 = time.perf_counter()
                tokens = await asyncio.gather(*(one(j) for j in planned))
            seconds = time.perf_counter() - t0
    finally:
        await engine.shutdown()
    return {
        "rows_per_s": round(len(rows) / seconds, 2),
        "tokens": sum(tokens),
        "concurrency": concurrency,
    }


# -- report -------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    lines = [
        "# slhf batch vs the server vs the bare chain",
        "",
        f"`{report['command']}` on {report['machine']} (demo model, {report['rows']} rows, "
        f"k = {report['rounds']}, max_tokens = {report['max_tokens']}).",
        "",
        "| system | concurrency | rows/s (median run) | every run | completion tokens "
        "| load avg before → after |",
        "|---|---|---|---|---|---|",
    ]
    for name in (n for n in ("batch", "server", "bare", "bare_planned") if n in r):
        x = r[name]
        c = x.get("best_concurrency", x.get("concurrency"))
        lines.append(
            f"| {name} | {c} | {x['rows_per_s']} | {x['runs_rows_per_s']} | {x['tokens']} | "
            f"{x['load_before']} → {x['load_after']} |"
        )
    for cell in r["server"]["cells"] if "server" in r else []:
        if "error" in cell:
            lines.append(f"| server c = {cell['concurrency']} | | failed: {cell['error']} | | | |")
            continue
        load_change = f"{cell['load_before']} → {cell['load_after']}"
        lines.append(
            f"| server c = {cell['concurrency']} | | {cell['rows_per_s']} | | {cell['tokens']} | "
            f"{load_change} |"
        )
    g = report["goals"]
    lines.append("")
    if "vs_server" in g:
        lines.append(
            f"- batch / server (best c): **{g['vs_server']:.3f}x** (goal >= 1.0: "
            f"{'met' if g['vs_server'] >= 1.0 else 'missed'})"
        )
    if "vs_bare" in g:
        lines.append(
            f"- batch / bare chain, rows planned before the clock: **{g['vs_bare']:.3f}x** (goal "
            f">= 0.9: {'met' if g['vs_bare'] >= 0.9 else 'missed'})"
        )
    if "vs_bare_planned" in g:
        lines.append(
            "- batch / bare chain, each row's body validated and planned within the clock: "
            f"**{g['vs_bare_planned']:.3f}x**"
        )
    lines += [
        "- the same completion tokens in every system = the same work (seeded rows)",
        f"- {report['note']}",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=384)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-concurrency", type=int, default=None, help="default: slhf batch's own")
    p.add_argument("--server-concurrency", type=int, nargs="+", default=[16, 64, 128, 256])
    p.add_argument(
        "--systems",
        nargs="+",
        choices=["bare", "bare_planned", "batch", "server"],
        default=["bare", "bare_planned", "batch", "server"],
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of each system, interleaved; medians reported"
    )
    p.add_argument("--note", default="", help="a line for the report (e.g. the machine was shared)")
    p.add_argument("--out", type=Path, default=RESULTS / "batch.json")
    args = p.parse_args()

    from slhf.batch import DEFAULT_CONCURRENCY

    rows = bodies(args.rows, args.rounds, args.max_tokens)
    warmup = bodies(16, args.rounds, args.max_tokens)
    concurrency = args.batch_concurrency or DEFAULT_CONCURRENCY
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.systems}
    for r in range(args.repeat):  # interleaved: a slow spell of the machine hits every system
        for name in args.systems:
            print(f"{name} (run {r + 1} of {args.repeat})...", file=sys.stderr, flush=True)
            before = load()
            if name == "batch":
                run = run_batch_cli(rows, args.batch_concurrency)
                run["concurrency"] = concurrency
            elif name == "server":
                run = run_server(rows, warmup, args.server_concurrency)
            else:
                plan_in_clock = name == "bare_planned"
                run = asyncio.run(_bare(rows, warmup, concurrency, plan_in_clock))
            run.update(load_before=before, load_after=load())
            runs[name].append(run)
            print(f"  {name}: {run['rows_per_s']} rows/s", file=sys.stderr, flush=True)
    results: dict[str, Any] = {}
    for name, done in runs.items():  # the median run (the lower middle one of an even count)
        ranked = sorted(done, key=lambda x: x["rows_per_s"])
        every = [x["rows_per_s"] for x in done]
        results[name] = {**ranked[(len(ranked) - 1) // 2], "runs_rows_per_s": every}
    report: dict[str, Any] = {
        "command": shlex.join(["python", "bench/batch.py", *sys.argv[1:]]),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})",
        "rows": args.rows,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "note": args.note or "measured alone",
        "results": results,
    }
    if "batch" in results:
        b = results["batch"]["rows_per_s"]
        report["goals"] = {
            f"vs_{other}": b / results[other]["rows_per_s"]
            for other in ("server", "bare", "bare_planned")
            if other in results
        }
        args.out.with_suffix(".md").write_text(markdown(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report.get("goals", results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
