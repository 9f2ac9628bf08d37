"""Serving throughput: our ``/v1/refine`` vs clients orchestrating the chain over vLLM's server.

The systems run the same Leader -> k Follower-round chain, one after another (never at once, so
they do not share the CPU), each warm, on the same model folder, templates, prompts, seeds and
sampling (32 new tokens per generation, early stop off):

1. ``ours``: ``slhf serve`` (``python -m slhf.cli serve``); the client posts ``/v1/refine``.
   Admission is set out of the way (``SLHF_MAX_INFLIGHT_GENERATIONS`` above the largest
   concurrency times two, so no request is ever rejected) and logs are quiet.
   ``ours[nice=N]`` (or ``--ours-niceness N ...``) starts it with ``SLHF_ENGINE_NICENESS=N``
   (the niceness the server gives vLLM's engine processes; unset: the server's default);
   ``ours[engine_metrics=off]`` with ``SLHF_ENGINE_METRICS=false`` (no vLLM request statistics,
   as the peer's default ``--disable-log-stats``: the like-for-like pair for the API CPU).
2. ``peer`` (also ``peer_tokens``): vLLM's own server
   (``python -m vllm.entrypoints.openai.api_server``); the expert client renders the Leader
   template with our ``TemplateRenderer`` and the model's tokenizer, sends the token ids to
   ``/v1/completions``, then k times the Follower template with the previous answer. Per-round
   seeds are ``slhf_server.refine.derive_seed`` -- the very seeds our server uses -- so both
   generate the same tokens. Flags: ``--peer-flags`` (default: the best honest setting found,
   see docs/performance.md).
3. ``peer_chat``: the same vLLM server driven as most users would: ``/v1/chat/completions`` with
   chat messages each round -- the Leader turn is ``[user: x]``, each Follower round
   ``[user: x] [assistant: y] [user: instruction]`` (``templates.follower_messages``, the
   manifest's instruction). Before measuring, one probe per role checks that vLLM renders these
   messages to exactly the ids our template gives (``return_token_ids``); where it does not,
   the run stops and names ``peer_text`` instead.
4. ``peer_text``: ``/v1/completions`` with the rendered prompt *text* (vLLM tokenizes it).
5. ``in_process``: the chain on an in-process engine (``VllmEngine`` + our ``Refiner``, no HTTP):
   the ceiling for a service next to the engine. ``in_process[nice=N]`` as for ours.

Each (system, k, c) cell reports requests/s, generated tokens/s, p50/p99 latency, and the CPU
seconds each process took during the cell (psutil, user + system): the load generator (this
process: ``client``), the server's API process (``api``; in-process that is this process too:
``client+api``), vLLM's ``engine_core`` and ``worker`` processes, the machine's busy seconds and
what no listed process accounts for (other processes, the kernel). Before each system the
benchmark lists any other process whose command line names vLLM, ``slhf serve``, ``slhf.cli``,
pytest or ``make test`` (recorded; ``--require-alone S`` waits up to S seconds for them to end
and fails otherwise). The prefix-cache hit rate comes from vLLM's counters read before and after
each cell (``/metrics`` for the servers, prometheus_client's registry in-process); the Follower
rounds' rate is the cell's counters minus the Leader share of the k = 0 cell of the same c.

On Linux with ``sched_autogroup`` the servers (started in their own session) and this load
generator get equal shares of the CPUs as two groups, whatever their niceness: on a 2-core box
the load generator then waits for a CPU most of the time (see the run-queue waits), which the
in-process system does not; ``--server-autogroup-nice N`` lowers the servers' session instead
(docs/performance.md, "Measured alone").

Run: ``.venv/bin/python bench/serving.py --quick`` (about 5 minutes on 2 cores) or without
``--quick`` (the full grid, more requests per cell); ``--cells K:C:N ...`` measures exactly
those cells instead of the grid, ``--repeat R`` each of them R times.
Writes ``bench/results/serving.json``, ``serving.md`` (the tables) and ``serving.png`` (the
plot); ``--out`` names another file.
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
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import procs
from bench.common import PROMPTS, REPO, bench_model_dir, in_process_job, pct, start_slhf
from slhf.launcher import LOOPBACK, ServerProcess, free_port

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
BASES = ("ours", "peer", "peer_chat", "peer_text", "in_process")
DEFAULT_SYSTEMS = ("ours", "peer", "peer_chat", "in_process")
ALIASES = {"peer_tokens": "peer"}
NICE_BASES = ("ours", "in_process")
PEER_FLAGS = "--disable-log-stats --disable-uvicorn-access-log"
API_CPU = "api_cpu_ms_per_request"
METRIC_NAMES = {"requests_per_s": "req/s", "p50_ms": "p50", API_CPU: "API CPU ms/req"}
_SYSTEM = re.compile(r"^([a-z_]+)(?:\[([a-z_=0-9,]*)\])?$")

OneRequest = Callable[[int, int], Awaitable[int]]
"""``one(i, k)`` runs request i with k rounds; returns the tokens it generated."""
Counters = Callable[[], Awaitable[dict[str, float]]]


@dataclass(frozen=True)
class System:
    """One system to measure: ``base`` (``ours``, ``peer``...) and, for ours and in-process,
    the engine niceness it is started with (None: the server's default); for ours, whether
    vLLM's request statistics (the ``vllm:*`` metrics, ``SLHF_ENGINE_METRICS``) are kept."""

    base: str
    nice: int | None = None
    engine_metrics: bool = True

    @property
    def name(self) -> str:
        options = [] if self.nice is None else [f"nice={self.nice}"]
        options += [] if self.engine_metrics else ["engine_metrics=off"]
        return f"{self.base}[{','.join(options)}]" if options else self.base


def parse_system(text: str) -> System:
    m = _SYSTEM.match(text.strip())
    base = ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or base not in BASES:
        raise argparse.ArgumentTypeError(
            f"unknown system {text!r}: one of {', '.join(BASES)} (peer_tokens = peer), "
            "ours and in_process optionally with [nice=N], ours with [engine_metrics=off]"
        )
    nice: int | None = None
    engine_metrics = True
    for option in filter(None, (m.group(2) or "").split(",")):
        key, _, value = option.partition("=")
        if key == "nice" and value.isdigit():
            nice = int(value)
        elif key == "engine_metrics" and value in ("on", "off"):
            engine_metrics = value == "on"
        else:
            raise argparse.ArgumentTypeError(f"unknown option {option!r} in {text!r}")
    if nice is not None and base not in NICE_BASES:
        raise argparse.ArgumentTypeError(f"{base} takes no [nice=N]: it is vLLM's own server")
    if not engine_metrics and base != "ours":
        raise argparse.ArgumentTypeError(
            f"{base} takes no [engine_metrics=off] (vLLM's server: --peer-flags)"
        )
    if nice is not None and not 0 <= nice <= 19:
        raise argparse.ArgumentTypeError("niceness must be 0..19")
    return System(base, nice, engine_metrics)


def parse_cell(text: str) -> tuple[int, int, int | None]:
    """``K:C`` or ``K:C:N`` (rounds, concurrency, requests)."""
    try:
        parts = [int(x) for x in text.split(":")]
        if len(parts) not in (2, 3) or parts[0] < 0 or any(x < 1 for x in parts[1:]):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"cell {text!r}: K:C or K:C:N") from None
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


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


# -- starting the servers -----------------------------------------------------------------------
def inflight_bound(args: argparse.Namespace) -> int:
    """Admission bound that never rejects: every request of the largest cell in flight."""
    return max(c for _, c, _ in args.cells) * (max(k for k, _, _ in args.cells) + 1) * 2


def start_ours(
    args: argparse.Namespace, nice: int | None, engine_metrics: bool = True
) -> ServerProcess:
    extra = {"SLHF_KV_BLOCK_SIZE": str(args.block_size)} if args.block_size else {}
    if nice is not None:
        extra["SLHF_ENGINE_NICENESS"] = str(nice)
    if not engine_metrics:
        extra["SLHF_ENGINE_METRICS"] = "false"
    return start_slhf(
        SLHF_MODEL=str(args.model),
        SLHF_MAX_MODEL_LEN=str(args.max_model_len),
        SLHF_MAX_INFLIGHT_GENERATIONS=str(inflight_bound(args)),
        SLHF_LOG_FORMAT="text",
        **extra,
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
        from slhf_server.app import resolve_served_weights
        from slhf_server.settings import ServerSettings

        self.args = args
        self.settings = ServerSettings(
            model=str(args.model), max_model_len=args.max_model_len, kv_block_size=args.block_size
        )
        weights = resolve_served_weights(self.settings)
        self.template = weights.manifest.template.to_config()
        self.leader_sp = sampling(weights.manifest.role("leader").sampling, args.max_tokens)
        self.follower_sp = sampling(weights.manifest.role("follower").sampling, args.max_tokens)
        self.checks: dict[str, Any] = {}

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
        self, one: OneRequest, counters: Counters, meter: procs.CpuMeter
    ) -> list[dict[str, Any]]:
        a = self.args
        burst = max(c for _, c, _ in a.cells)
        for i in range(a.warmup):  # warm-up: every k once, a burst at the largest c
            await asyncio.gather(*(one(i * 64 + j, j % 4) for j in range(burst)))
        rows = []
        for j, (k, c, n) in enumerate([cell for cell in a.cells for _ in range(a.repeat)]):
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
            cpu0 = meter.snapshot()
            t0 = time.perf_counter()
            tokens = await asyncio.gather(*(timed(i) for i in range(n)))
            wall = time.perf_counter() - t0
            cpu1 = meter.snapshot()
            after = await counters()
            cpu = procs.cpu_delta(cpu0, cpu1)
            rows.append(
                {
                    "rounds": k,
                    "concurrency": c,
                    "requests": n,
                    "repeat": j % a.repeat,
                    "wall_s": wall,
                    "requests_per_s": n / wall,
                    "generated_tokens_per_s": sum(tokens) / wall,
                    "generated_tokens_per_request": sum(tokens) / n,
                    "p50_ms": statistics.median(lat),
                    "p99_ms": pct(lat, 0.99),
                    "prefix_cache_queries": after["queries"] - before["queries"],
                    "prefix_cache_hits": after["hits"] - before["hits"],
                    "cpu": cpu,
                }
            )
            r = rows[-1]
            roles = " ".join(f"{role} {s:.1f}" for role, s in cpu["cpu_s"].items())
            waits = " ".join(f"{role} {s:.1f}" for role, s in cpu["runqueue_wait_s"].items())
            print(
                f"  k={k} c={c:>2} n={n:>3}: {r['requests_per_s']:7.2f} req/s "
                f"{r['generated_tokens_per_s']:8.0f} tok/s p50 {r['p50_ms']:7.1f} ms "
                f"p99 {r['p99_ms']:7.1f} ms | wall {wall:.1f} s, CPU s: {roles}, "
                f"machine busy {cpu['machine_busy_s']:.1f} / {cpu['machine_capacity_s']:.1f}, "
                f"unaccounted {cpu['unaccounted_s']:.1f}; waiting for a CPU s: {waits}",
                flush=True,
            )
        return rows

    async def http_grid(
        self,
        server: ServerProcess,
        one_for: Callable[[httpx.AsyncClient], OneRequest],
        probe: Callable[[httpx.AsyncClient], Awaitable[None]] | None = None,
    ) -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        if self.args.server_autogroup_nice is not None:
            self.checks[f"autogroup_{server.pid}"] = procs.set_autogroup_nice(
                server.pid, self.args.server_autogroup_nice
            )
        meter = procs.CpuMeter([(os.getpid(), "client", False), (server.pid, "api", True)])
        self.last_processes = procs.process_table(meter.snapshot())
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
            if probe is not None:
                await probe(client)

            async def counters() -> dict[str, float]:
                return prefix_counters((await client.get("/metrics")).text)

            return await self.grid(one_for(client), counters, meter)

    def run(self, system: System) -> tuple[list[dict[str, Any]], float]:
        self.last_processes: list[dict[str, Any]] = []
        if system.base == "ours":
            return self.run_ours(system.nice, system.engine_metrics)
        if system.base == "in_process":
            return asyncio.run(self._in_process(system.nice))
        return self.run_peer(system.base)

    # ours ------------------------------------------------------------------------------------
    def run_ours(
        self, nice: int | None, engine_metrics: bool = True
    ) -> tuple[list[dict[str, Any]], float]:
        with start_ours(self.args, nice, engine_metrics) as server:

            def one_for(client: httpx.AsyncClient) -> OneRequest:
                async def one(i: int, k: int) -> int:
                    r = await client.post("/v1/refine", json=self.body(i, k))
                    if r.status_code != 200:
                        raise SystemExit(f"/v1/refine: {r.status_code} {r.text}")
                    return int(r.json()["usage"]["completion_tokens"])

                return one

            return asyncio.run(self.http_grid(server, one_for)), server.startup_s

    # the peers -------------------------------------------------------------------------------
    def run_peer(self, base: str) -> tuple[list[dict[str, Any]], float]:
        from transformers import AutoTokenizer

        from slhf_models.serving.templates import (
            TemplateRenderer,
            follower_messages,
            leader_messages,
        )
        from slhf_server.refine import derive_seed

        tok = AutoTokenizer.from_pretrained(str(self.args.model))
        renderer = TemplateRenderer(tok, self.template)
        instruction = self.template.follower_instruction
        model = str(self.args.model)

        def one_for(client: httpx.AsyncClient) -> OneRequest:
            async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
                r = await client.post(path, json=body)
                if r.status_code != 200:
                    raise SystemExit(f"{path}: {r.status_code} {r.text[:500]}")
                return r.json()

            async def generate(
                role: str, prompt: str, answer: str | None, sp: dict[str, Any], seed: int | None
            ) -> tuple[str, int]:
                body: dict[str, Any] = {"model": model, "seed": seed, **sp}
                if base == "peer_chat":
                    body["messages"] = (
                        leader_messages(prompt)
                        if role == "leader"
                        else follower_messages(prompt, answer or "", instruction)
                    )
                    out = await post("/v1/chat/completions", body)
                    text = out["choices"][0]["message"]["content"] or ""
                else:
                    rendered = renderer.render(role, prompt, answer)
                    body["prompt"] = renderer.encode(rendered) if base == "peer" else rendered
                    out = await post("/v1/completions", body)
                    text = out["choices"][0]["text"]
                return text, int(out["usage"]["completion_tokens"])

            async def one(i: int, k: int) -> int:
                prompt, seed = PROMPTS[i % len(PROMPTS)], self.seed(i)
                answer, tokens = await generate(
                    "leader", prompt, None, self.leader_sp, derive_seed(seed, 0)
                )
                for r in range(1, k + 1):
                    answer, n = await generate(
                        "follower", prompt, answer, self.follower_sp, derive_seed(seed, r)
                    )
                    tokens += n
                return tokens

            return one

        async def probe_chat(client: httpx.AsyncClient) -> None:
            """vLLM's rendering of our chat messages must be our template's ids, per role."""
            prompt, answer = PROMPTS[0], "Gravity pulls things down.\nIt is a force."
            found = {}
            for role, messages in (
                ("leader", leader_messages(prompt)),
                ("follower", follower_messages(prompt, answer, instruction)),
            ):
                body = {"model": model, "messages": messages, "max_tokens": 1}
                body["return_token_ids"] = True
                r = await client.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                got = r.json().get("prompt_token_ids")
                want = renderer.encode_role(role, prompt, None if role == "leader" else answer)
                found[role] = got == want
                if got != want:
                    raise SystemExit(
                        f"peer_chat: vLLM renders the {role} chat messages to other ids than our "
                        f"template ({got} vs {want}); measure peer_text (/v1/completions with the "
                        "rendered text) instead"
                    )
            self.checks["peer_chat_renders_our_template"] = found
            print(f"  peer_chat: chat messages render to our template's ids: {found}", flush=True)

        with start_peer(self.args) as peer:
            probe = probe_chat if base == "peer_chat" else None
            return asyncio.run(self.http_grid(peer, one_for, probe)), peer.startup_s

    # in-process ------------------------------------------------------------------------------
    async def _in_process(self, nice: int | None) -> tuple[list[dict[str, Any]], float]:
        import prometheus_client

        from slhf_server.app import resolve_served_weights
        from slhf_server.service import Service
        from slhf_server.vllm_engine import VllmEngine

        settings = self.settings
        if nice is not None:
            settings = settings.model_copy(update={"engine_niceness": nice})
        weights = resolve_served_weights(settings)
        engine = VllmEngine.start(weights, settings)
        service = Service.build(settings, weights, engine)
        meter = procs.CpuMeter([(os.getpid(), "client+api", True)])
        self.last_processes = procs.process_table(meter.snapshot())

        async def one(i: int, k: int) -> int:
            out = await service.refiner.refine(in_process_job(service, self.body(i, k)))
            return out.usage.completion_tokens

        async def counters() -> dict[str, float]:
            return prefix_counters(prometheus_client.generate_latest().decode())

        try:
            return await self.grid(one, counters, meter), engine.startup_seconds
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


def cells_table(res: dict[str, list[dict[str, Any]]]) -> str:
    """One line per (system, cell): speed, latency, CPU seconds per process role."""
    lines = [
        "| system | k | c | n | wall s | req/s | tok/s | p50 ms | p99 ms | Follower prefix hit "
        "| CPU s: client | api | engine core | worker(s) | other children | machine busy / "
        "capacity | unaccounted | waiting for a CPU s: client / api / engine core / worker "
        "| engine nice |",
        "|" + "---|" * 19,
    ]
    for system, rows in res.items():
        for r in rows:
            cpu = r["cpu"]
            s = cpu["cpu_s"]
            hit = r["follower_prefix_cache_hit_rate"]
            client = s.get("client", s.get("client+api"))
            ms = api_cpu_ms(r)
            api = "(in client)" if ms is None else f"{s['api']:.2f} ({ms:.1f} ms/req)"
            others = sum(v for role, v in s.items() if role in ("mp_helper", "other_child"))
            nice = cpu["nice"].get("engine_core", cpu["nice"].get("worker", "–"))
            w = cpu.get("runqueue_wait_s", {})
            first = "client+api" if "client+api" in w else "client"
            waits = " / ".join(
                f"{w[role]:.1f}" if role in w else "–"
                for role in (first, "api", "engine_core", "worker")
            )
            lines.append(
                f"| {system} | {r['rounds']} | {r['concurrency']} | {r['requests']} "
                f"| {r['wall_s']:.1f} | {r['requests_per_s']:.1f} "
                f"| {r['generated_tokens_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
                f"| {'–' if hit is None else f'{hit:.0%}'} "
                f"| {client:.1f} | {api} | {s.get('engine_core', 0):.1f} "
                f"| {s.get('worker', 0):.1f} | {others:.1f} "
                f"| {cpu['machine_busy_s']:.1f} / {cpu['machine_capacity_s']:.1f} "
                f"| {cpu['unaccounted_s']:.1f} | {waits} | {nice} |"
            )
    return "\n".join(lines) + "\n"


def goal(other: str, k: int, c: int, metric: str) -> tuple[str, float] | None:
    """The serving goal (docs/performance.md) for ours / ``other`` (a base name) in cell (k, c), if
    it sets one."""
    if metric == "requests_per_s":
        if other == "in_process" and (k, c) == (2, 32):
            return ">=", 0.8
        if other == "peer_chat" and k >= 1 and c in (8, 32):
            return ">=", 1.3
        if other == "peer" and k >= 1 and c in (8, 32):
            return ">=", 1.0
    if metric == "p50_ms" and other == "in_process" and c == 1:
        return "<=", 1.10
    if metric == API_CPU and k == 2 and c == 32:  # the front end's goal (docs/performance.md)
        return {"peer_chat": ("<=", 0.6), "peer": ("<=", 0.8)}.get(other)
    return None


def api_cpu_ms(row: dict[str, Any]) -> float | None:
    """The server's API process's CPU ms per request (chain) in a cell; None in-process, where
    the API and the load generator are one process."""
    api = row["cpu"]["cpu_s"].get("api")
    return None if api is None else 1000.0 * api / row["requests"]


def median_rows(rows: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, float]]:
    """Per (k, c): the median requests/s, p50 and API-process CPU ms per request over the
    cell's repeats (the last only for servers)."""
    by: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["rounds"], r["concurrency"]), []).append(r)
    out = {
        key: {m: statistics.median(r[m] for r in rs) for m in ("requests_per_s", "p50_ms")}
        for key, rs in by.items()
    }
    for key, rs in by.items():
        cpu = [x for x in map(api_cpu_ms, rs) if x is not None]
        if cpu:
            out[key][API_CPU] = statistics.median(cpu)
    return out


def ratios(res: dict[str, list[dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    """Each ``ours*`` system against every other system on the cells both ran: requests/s, at
    c = 1 p50 latency, and against the other servers the API process's CPU per request (medians
    over ``--repeat``); with the goal where one is set."""
    idx = {s: median_rows(rows) for s, rows in res.items()}
    out = []
    for mine in (s for s in res if parse_system(s).base == "ours"):
        for other in (s for s in res if s != mine):
            for key in sorted(idx[mine], key=lambda kc: (kc[0], -kc[1])):
                theirs = idx[other].get(key)
                if theirs is None:
                    continue
                metrics = ["requests_per_s"] + (["p50_ms"] if key[1] == 1 else [])
                metrics += [API_CPU] if API_CPU in idx[mine][key] and API_CPU in theirs else []
                for metric in metrics:
                    value = idx[mine][key][metric] / theirs[metric]
                    g = goal(parse_system(other).base, *key, metric)
                    met = None if g is None else (value >= g[1] if g[0] == ">=" else value <= g[1])
                    out.append(
                        {
                            "system": mine,
                            "versus": other,
                            "rounds": key[0],
                            "concurrency": key[1],
                            "metric": metric,
                            "ratio": value,
                            "goal": None if g is None else f"{g[0]} {g[1]}",
                            "met": met,
                        }
                    )
    lines = ["| k | c | ours | versus | metric | ratio | goal | met |", "|" + "---|" * 8]
    for r in out:
        met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['rounds']} | {r['concurrency']} | {r['system']} | {r['versus']} "
            f"| {METRIC_NAMES[str(r['metric'])]} | {r['ratio']:.2f}x "
            f"| {r['goal'] or '–'} | {met} |"
        )
    return "\n".join(lines) + "\n", out


def plot(res: dict[str, list[dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted({r["rounds"] for rows in res.values() for r in rows})
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


def uptime() -> str:
    try:
        done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
        return done.stdout.strip()
    except OSError:
        return f"load average {load_average()}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def expand_systems(args: argparse.Namespace) -> list[System]:
    """``--systems`` with each plain ``ours`` replaced by one ``ours[nice=N]`` per
    ``--ours-niceness`` value; duplicates dropped, order kept."""
    out: list[System] = []
    for s in args.systems:
        group = (
            [System("ours", n) for n in args.ours_niceness]
            if s == System("ours") and args.ours_niceness
            else [s]
        )
        out += [g for g in group if g not in out]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per cell (~5 min)")
    ap.add_argument(
        "--systems",
        nargs="+",
        type=parse_system,
        default=[System(s) for s in DEFAULT_SYSTEMS],
        metavar="SYSTEM",
        help=f"any of {', '.join(BASES)} (peer_tokens = peer); ours and in_process may carry "
        f"[nice=N] (SLHF_ENGINE_NICENESS). Default: {' '.join(DEFAULT_SYSTEMS)}",
    )
    ap.add_argument(
        "--ours-niceness",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="run ours once per value with SLHF_ENGINE_NICENESS=N, as ours[nice=N]",
    )
    ap.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-c", type=int, default=None, help="requests per cell / c")
    ap.add_argument("--requests-c1", type=int, default=None, help="requests per cell at c = 1")
    ap.add_argument(
        "--cells",
        type=parse_cell,
        nargs="+",
        default=None,
        metavar="K:C[:N]",
        help="measure exactly these cells (rounds:concurrency[:requests]) instead of the "
        "--rounds x --concurrency grid; N defaults as in the grid",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each cell this many times back to back on the same warm system "
        "(ratios use the medians)",
    )
    ap.add_argument("--warmup", type=int, default=1, help="warm-up bursts (not measured)")
    ap.add_argument(
        "--require-alone",
        type=float,
        default=None,
        metavar="S",
        help="before each system wait up to S seconds for other engine / server / test "
        "processes to end; fail if they do not (default: only record and warn)",
    )
    ap.add_argument(
        "--seeded",
        action="store_true",
        help="per-request seeds (identical tokens on all sides); off by default because "
        "vllm-cpu 0.32 kills the engine when a seeded request's prefill is chunked "
        "('CPU Generator does not use offset')",
    )
    ap.add_argument(
        "--server-autogroup-nice",
        type=int,
        default=None,
        metavar="N",
        help="Linux autogroup niceness for the servers' session (ours and the peers run in "
        "their own session, so in their own scheduling autogroup; N > 0 makes the whole "
        "server yield to this load generator; no privilege needed). Default: left alone",
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="KV-cache block size for all systems (default: vLLM's; 128 on CPU)",
    )
    ap.add_argument("--model", type=Path, default=None, help="default: the random tiny llama")
    ap.add_argument("--peer-flags", default=PEER_FLAGS, help="extra flags for vLLM's server")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serving.json")
    args = ap.parse_args()
    if args.requests_per_c is None:
        args.requests_per_c = 2 if args.quick else 8
    if args.requests_c1 is None:
        args.requests_c1 = 8 if args.quick else 32
    if args.model is None:
        args.model = bench_model_dir()

    def requests(c: int) -> int:
        return args.requests_per_c * c if c > 1 else args.requests_c1

    if args.cells:
        args.cells = [(k, c, n or requests(c)) for k, c, n in args.cells]
    else:
        args.cells = [(k, c, requests(c)) for c in args.concurrency for k in args.rounds]
    systems = expand_systems(args)

    bench = Bench(args)
    res: dict[str, list[dict[str, Any]]] = {}
    ready: dict[str, float] = {}
    alone: dict[str, list[dict[str, Any]]] = {}
    alone_after: dict[str, list[dict[str, Any]]] = {}
    processes: dict[str, list[dict[str, Any]]] = {}
    load: dict[str, list[float]] = {"start": load_average()}
    uptimes = {"start": uptime()}
    t_all = time.perf_counter()
    for system in systems:  # in-process last by default: its engine runs in this process
        name = system.name
        print(f"{name}:", flush=True)
        alone[name] = procs.wait_alone(args.require_alone)
        if alone[name] and args.require_alone is not None:
            raise SystemExit(f"not alone after {args.require_alone:.0f} s; stopping before {name}")
        res[name], ready[name] = bench.run(system)
        processes[name] = bench.last_processes
        alone_after[name] = procs.others_running()
        if alone_after[name]:
            print(f"WARNING: other processes appeared during {name}: {alone_after[name]}")
        follower_hit_rates(res[name])
        load[f"after_{name}"] = load_average()
    uptimes["end"] = uptime()
    md_cells = cells_table(res)
    md_ratios, ratio_rows = ratios(res)
    print(md_cells + "\n" + md_ratios)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *map(shlex.quote, sys.argv)])
    doc = {
        "benchmark": "serving",
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1_5_15": load,
            "uptime": uptimes,
        },
        "settings": {
            "quick": args.quick,
            "systems": [s.name for s in systems],
            "cells": [{"rounds": k, "concurrency": c, "requests": n} for k, c, n in args.cells],
            "model": "tiny-llama (slhf_models.tiny.random_model_dir)",
            "max_tokens": args.max_tokens,
            "stop_when_unchanged": False,
            "seeded": args.seeded,
            "leader_sampling": bench.leader_sp,
            "follower_sampling": bench.follower_sp,
            "peer_flags": args.peer_flags,
            "block_size": args.block_size,
            "vllm_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),
            "slhf_engine_niceness_env": os.environ.get("SLHF_ENGINE_NICENESS"),
            "ours_max_inflight_generations": inflight_bound(args),
            "warmup_bursts": args.warmup,
            "server_autogroup_nice": args.server_autogroup_nice,
            "autogroup_enabled": procs.autogroup_enabled(),
            "repeat": args.repeat,
        },
        "alone_check": {
            "patterns": list(procs.BUSY_PATTERNS),
            "require_alone_s": args.require_alone,
            "others_before_each_system": alone,
            "others_after_each_system": alone_after,
        },
        "checks": bench.checks,
        "processes": processes,
        "startup_s": ready,
        "total_s": time.perf_counter() - t_all,
        "results": res,
        "ratios": ratio_rows,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    not_alone = {s: len(v) for s, v in alone.items() if v}
    not_alone.update({f"after {s}": len(v) for s, v in alone_after.items() if v})
    header = (
        f"Command: `{command}`; machine: {platform.platform()}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs. `uptime` at start: `{uptimes['start']}`; at the end: "
        f"`{uptimes['end']}`. Other engine/server/test processes before / after each system: "
        f"{not_alone or 'none'}. Peer flags: `{args.peer_flags}`. {args.max_tokens} new tokens "
        "per generation, early stop off. CPU s: user + system seconds of each process during "
        "the cell (client = this load generator; in-process, client+api = this process); "
        "machine busy / capacity: all CPUs' busy seconds / wall × CPUs; unaccounted: busy "
        "seconds no listed process took (other processes, the kernel); waiting for a CPU: seconds "
        "the role's threads were runnable but not running (run-queue wait, schedstat).\n\n"
    )
    out.with_suffix(".md").write_text(header + md_cells + "\nRatios:\n\n" + md_ratios)
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out} (total {doc['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
