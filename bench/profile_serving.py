"""Where the CPU goes while our server runs k Follower rounds at concurrency c: a py-spy profile
of every process (docs/performance.md: where the CPU time goes).

Starts ``slhf serve`` on the benchmarks' random tiny llama alone (as ``bench/serving.py`` starts
``ours``: 32 new tokens per generation, early stop off), warms it, then for ``--seconds`` keeps
``c`` requests in flight while py-spy samples the server's process tree (``--subprocesses``: the
API process, vLLM's engine core and its worker) and, separately, this load generator. py-spy
keeps only samples of threads that were running (idle ones are left out), so a process's
samples are roughly its CPU time, split into what it was doing: running the model, spinning
(``sched_yield`` in vLLM's shared-memory queue), in a wait call that had not yet slept
(``select``, ``poll``, a lock), or other Python. The same window's CPU seconds and run-queue
waits per process come from ``procs.CpuMeter``. Needs ``py-spy`` (``pip install py-spy``;
ptrace: root, or ``kernel.yama.ptrace_scope`` 0)::

    python bench/profile_serving.py --k 2 --c 32 --seconds 20 --out bench/results/profile_k2_c32

Writes OUT.json (per process: samples by category, top leaf frames; CPU and wait seconds),
OUT.md (the table) and OUT.raw.txt.gz (py-spy's collapsed stacks, for a flame graph tool).
Sampling slows the sampled processes a little: read the request rate as indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench import procs
from bench.common import PROMPTS, start_slhf

#: A sample's category, from its frames (leaf last): the first rule that matches wins.
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("spin", re.compile(r"sched_yield|SpinCondition|spin")),
    ("model", re.compile(r"execute_model|_model_forward|forward \(|sample_tokens|torch/")),
    (
        "blocked",
        re.compile(r"\b(select|poll|epoll|wait|acquire|recv|recv_multipart|sleep|_recv|get)\b"),
    ),
]


def pyspy() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def category(frames: list[str]) -> str:
    leaf_first = ";".join(reversed(frames))
    for name, pattern in CATEGORIES:
        # spin and blocked are judged on the innermost frames, model on the whole stack
        where = leaf_first if name == "model" else ";".join(reversed(frames[-3:]))
        if pattern.search(where):
            return name
    return "other"


_PROCESS = re.compile(r'^process (\d+):"(.*)"$')


def parse_raw(text: str, pid: int = 0, cmdline: str = "?") -> dict[int, dict[str, Any]]:
    """py-spy's raw (collapsed) output, ``frame;frame;... count`` per line: samples per process
    by category, and each process's most sampled leaf frames. With ``--subprocesses`` a stack
    starts with its process's ancestry (``process PID:"cmdline"`` frames, the sampled process
    last); without, every stack is ``pid``'s."""
    out: dict[int, dict[str, Any]] = {}
    leaves: dict[int, Counter[str]] = defaultdict(Counter)
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        owner, cmd = pid, cmdline
        while frames and (m := _PROCESS.match(frames[0])):
            owner, cmd = int(m[1]), m[2]
            frames = frames[1:]
        entry = out.setdefault(owner, {"cmdline": cmd[:120], "samples": 0, "by_category": {}})
        n = int(count)
        entry["samples"] += n
        cat = category(frames) if frames else "blocked"
        entry["by_category"][cat] = entry["by_category"].get(cat, 0) + n
        leaves[owner][frames[-1] if frames else "(no Python frame)"] += n
    for owner, entry in out.items():
        entry["top_leaves"] = leaves[owner].most_common(8)
    return out


def api_functions(text: str, pid: int, top: int = 25) -> list[dict[str, Any]]:
    """The functions of process ``pid`` in py-spy's raw output, by share of its samples: each
    function's inclusive share (on the stack) and self share (the leaf), most inclusive first
    (frames are ``name (file:line)``; the line is dropped so a function counts once)."""
    total = 0
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        owner = 0
        while frames and (m := _PROCESS.match(frames[0])):
            owner = int(m[1])
            frames = frames[1:]
        if owner != pid:
            continue
        n = int(count)
        total += n
        names = [re.sub(r":\d+\)$", ")", f) for f in frames]
        for name in set(names):
            inclusive[name] += n
        if names:
            leaf[names[-1]] += n
    return [
        {
            "function": name,
            "inclusive": round(n / max(total, 1), 4),
            "self": round(leaf[name] / max(total, 1), 4),
        }
        for name, n in inclusive.most_common(top)
    ]


async def drive(url: str, body_for: Any, c: int, seconds: float) -> dict[str, Any]:
    """Keep ``c`` requests in flight for ``seconds``; count the finished ones."""
    done = 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.monotonic() < stop:
                r = await client.post("/v1/refine", json=body_for(i))
                if r.status_code != 200:
                    raise SystemExit(f"/v1/refine: {r.status_code} {r.text}")
                done += 1
                i += c

        t0 = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(c)))
        wall = time.monotonic() - t0
    return {"requests": done, "wall_s": round(wall, 2), "req_per_s": round(done / wall, 2)}


def table(rows: list[dict[str, Any]]) -> str:
    cats = ["model", "spin", "blocked", "other"]
    out = [
        "| process | role | CPU s | run-queue wait s | samples | "
        + " | ".join(cats)
        + " | top leaf frame |",
        "|---|---|---|---|---|" + "---|" * len(cats) + "---|",
    ]
    for r in rows:
        n = max(r["samples"], 1)
        shares = " | ".join(f"{r['by_category'].get(c, 0) / n:.0%}" for c in cats)
        top = r["top_leaves"][0][0] if r["top_leaves"] else "–"
        out.append(
            f"| {r['pid']} | {r['role']} | {r['cpu_s']:.2f} | {r['wait_s']:.2f} | "
            f"{r['samples']} | {shares} | `{top[:70]}` |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=2, help="Follower rounds")
    ap.add_argument("--c", type=int, default=32, help="requests in flight")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--server-autogroup-nice",
        type=int,
        help="autogroup niceness of the server's session (bench/serving.py's option)",
    )
    ap.add_argument("--out", type=Path, help="write OUT.json, OUT.md and OUT.raw.txt.gz")
    ap.add_argument(
        "--allow-others",
        action="store_true",
        help="profile even when other engine / server / test processes run (recorded)",
    )
    ap.add_argument(
        "--api-functions",
        type=int,
        default=0,
        metavar="N",
        help="also list the API process's N most sampled functions (inclusive and self shares)",
    )
    args = ap.parse_args()
    spy = pyspy()
    others = procs.others_running()
    if others and not args.allow_others:
        raise SystemExit(f"not alone: {[o['cmdline'] for o in others]}")
    load_before = os.getloadavg()

    sampling = {"max_tokens": args.max_tokens}
    c = args.c

    def body_for(i: int) -> dict[str, Any]:
        return {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "rounds": args.k,
            "stop_when_unchanged": False,
            "leader": sampling,
            "follower": sampling,
        }

    with start_slhf(  # the model: common.bench_model_dir(), the random tiny llama
        SLHF_MAX_MODEL_LEN="1024",
        SLHF_MAX_INFLIGHT_GENERATIONS=str(4 * c * (args.k + 1)),
        SLHF_LOG_FORMAT="text",
    ) as server:
        autogroup = None
        if args.server_autogroup_nice is not None:
            autogroup = procs.set_autogroup_nice(server.pid, args.server_autogroup_nice)
        asyncio.run(drive(server.url, body_for, c, 5.0))  # warm-up
        raw_dir = Path(os.environ.get("TMPDIR", "/tmp"))
        server_raw = raw_dir / f"slhf-profile-server-{server.pid}.txt"
        client_raw = raw_dir / f"slhf-profile-client-{os.getpid()}.txt"
        common = ["record", "--nonblocking", "--format", "raw", "--rate"]
        common += [str(args.rate), "--duration", str(int(args.seconds))]
        spies = [
            subprocess.Popen(
                [spy, *common, "--subprocesses", "--pid", str(server.pid), "-o", str(server_raw)],
                stdout=subprocess.DEVNULL,
            ),
            subprocess.Popen(
                [spy, *common, "--pid", str(os.getpid()), "-o", str(client_raw)],
                stdout=subprocess.DEVNULL,
            ),
        ]
        meter = procs.CpuMeter([(os.getpid(), "client", False), (server.pid, "api", True)])
        before = meter.snapshot()
        load = asyncio.run(drive(server.url, body_for, c, args.seconds))
        after = meter.snapshot()
        for p in spies:
            if p.wait(timeout=120) != 0:
                raise SystemExit(f"py-spy failed (exit {p.returncode}); is ptrace allowed?")
        functions = api_functions(server_raw.read_text(), server.pid, args.api_functions)
        profiled = parse_raw(server_raw.read_text())
        profiled.update(parse_raw(client_raw.read_text(), os.getpid(), "bench/profile_serving.py"))
        raw_text = server_raw.read_text() + client_raw.read_text()
        server_raw.unlink()
        client_raw.unlink()

    rows = []
    for pid, entry in sorted(profiled.items()):
        a, b = after.procs.get(pid), before.procs.get(pid)
        role = a.role if a else ("client" if pid == os.getpid() else "?")
        cpu = (a.cpu_s - (b.cpu_s if b else 0.0)) if a else 0.0
        wait = (a.wait_s - (b.wait_s if b else 0.0)) if a else 0.0
        rows.append({"pid": pid, "role": role, "cpu_s": cpu, "wait_s": wait, **entry})
    delta = procs.cpu_delta(before, after)
    md = table(rows)
    api_cpu = sum(r["cpu_s"] for r in rows if r["role"] == "api")
    head = (
        f"k = {args.k}, c = {c}, {args.seconds:.0f} s at {args.rate} samples/s: "
        f"{load['requests']} requests, {load['req_per_s']} req/s while sampled; machine busy "
        f"{delta['machine_busy_s']:.1f} of {delta['machine_capacity_s']:.1f} CPU s; API "
        f"process {1000 * api_cpu / max(load['requests'], 1):.2f} CPU ms per request; load "
        f"average before {' '.join(f'{x:.2f}' for x in load_before)}, other processes "
        f"before: {len(others)}"
    )
    if functions:
        md += "\n\nAPI process, most sampled functions (share of its samples):\n\n"
        md += "| function | inclusive | self |\n|---|---|---|\n"
        md += "\n".join(
            f"| `{f['function'][:110]}` | {f['inclusive']:.1%} | {f['self']:.1%} |"
            for f in functions
        )
    print(head)
    print(md)
    if args.out:
        record = {
            "command": "python bench/profile_serving.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()} {platform.platform()}, {os.cpu_count()} CPUs",
            "autogroup_enabled": procs.autogroup_enabled(),
            "server_autogroup": autogroup,
            "alone_before": others,
            "load_average_before": load_before,
            "api_cpu_ms_per_request": 1000 * api_cpu / max(load["requests"], 1),
            "api_functions": functions,
            "load": load,
            "cpu": delta,
            "processes": rows,
            "categories": {name: p.pattern for name, p in CATEGORIES},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(f"`{record['command']}`\n\n{head}\n\n{md}\n")
        with gzip.open(args.out.with_suffix(".raw.txt.gz"), "wt") as f:
            f.write(raw_text)


if __name__ == "__main__":
    main()
