"""What else runs on the machine, and where a benchmark cell's CPU time went.

- ``others_running``: processes, other than this one, its children and its ancestors, whose
  command line names an engine, a server or a test run (``BUSY_PATTERNS``, case-insensitive:
  vLLM's engine processes call themselves ``VLLM::EngineCore`` / ``VLLM::Worker``). A benchmark
  that shares two cores with them measures them too.
- ``CpuMeter``: user + system CPU seconds of chosen process trees (a server's API process and
  its descendants, the load generator) and of the whole machine, before and after a cell; the
  difference is labelled by role (``client``, ``api``, ``engine_core``, ``worker``...). Also the
  seconds each role's threads were runnable but waiting for a CPU (the run-queue wait of
  ``/proc/PID/task/*/schedstat``): CPU seconds say who worked, wait seconds who was starved.

psutil reads ``/proc``: no privilege needed, nothing is changed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BUSY_PATTERNS = ("vllm", "slhf serve", "slhf.cli", "pytest", "make test")


def short_cmdline(proc: psutil.Process, width: int = 160) -> str:
    try:
        cmd = " ".join(proc.cmdline()).strip() or proc.name()
    except psutil.Error:
        return "?"
    return cmd if len(cmd) <= width else cmd[: width - 1] + "…"


def own_pids() -> set[int]:
    """This process, its descendants and its ancestors (the shell or make that started it)."""
    me = psutil.Process()
    pids = {me.pid}
    pids |= {p.pid for p in me.children(recursive=True)}
    pids |= {p.pid for p in me.parents()}
    return pids


def others_running(patterns: tuple[str, ...] = BUSY_PATTERNS) -> list[dict[str, Any]]:
    """Processes not ours whose command line contains one of ``patterns`` (case-insensitive)."""
    own = own_pids()
    found = []
    for proc in psutil.process_iter():
        if proc.pid in own:
            continue
        cmd = short_cmdline(proc, width=10_000)
        low = cmd.lower()
        hit = next((p for p in patterns if p in low), None)
        if hit:
            found.append({"pid": proc.pid, "matched": hit, "cmdline": short_cmdline(proc)})
    return found


def wait_alone(timeout_s: float | None, poll_s: float = 5.0) -> list[dict[str, Any]]:
    """``others_running()``, waiting up to ``timeout_s`` (None: not at all) for it to be empty.
    Prints a loud warning for what is still there; returns it."""
    deadline = time.monotonic() + (timeout_s or 0.0)
    others = others_running()
    while others and timeout_s and time.monotonic() < deadline:
        print(
            f"  waiting for {len(others)} other process(es) to end (up to "
            f"{deadline - time.monotonic():.0f} s more): "
            + ", ".join(str(o["pid"]) for o in others),
            file=sys.stderr,
            flush=True,
        )
        time.sleep(poll_s)
        others = others_running()
    if others:
        bar = "!" * 78
        lines = [f"  {o['pid']:>7}  {o['cmdline']}" for o in others]
        print(
            f"{bar}\nWARNING: NOT ALONE: {len(others)} other engine/server/test process(es) "
            f"running; the figures measure them too:\n" + "\n".join(lines) + f"\n{bar}",
            file=sys.stderr,
            flush=True,
        )
    return others


def role_of(proc: psutil.Process) -> str:
    """A descendant's role, from its title (vLLM sets ``VLLM::EngineCore``, ``VLLM::Worker``)."""
    text = short_cmdline(proc, width=10_000)
    with contextlib.suppress(psutil.Error):
        text += " " + proc.name()
    if "EngineCore" in text:
        return "engine_core"
    if "Worker" in text:
        return "worker"
    if "resource_tracker" in text or "multiprocessing" in text:
        return "mp_helper"
    return "other_child"


@dataclass
class ProcSample:
    role: str
    cpu_s: float
    nice: int
    cmdline: str
    wait_s: float = 0.0


@dataclass
class Snapshot:
    t: float
    procs: dict[int, ProcSample]
    machine_busy_s: float
    machine_steal_s: float
    roots: list[tuple[int, str, bool]] = field(default_factory=list)


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _runqueue_wait_s(pid: int) -> float:
    """Seconds this process's live threads spent runnable, waiting for a CPU (0 without
    schedstat)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def _machine() -> tuple[float, float]:
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, getattr(t, "steal", 0.0)


class CpuMeter:
    """CPU seconds per role of some process trees. ``roots``: ``(pid, role, with_children)``;
    a root's descendants get ``role_of``'s labels."""

    def __init__(self, roots: list[tuple[int, str, bool]]) -> None:
        self.roots = roots

    def snapshot(self) -> Snapshot:
        procs: dict[int, ProcSample] = {}
        for pid, role, with_children in self.roots:
            try:
                root = psutil.Process(pid)
                members = [(root, role)]
                if with_children:
                    members += [(c, role_of(c)) for c in root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc, r in members:
                if proc.pid in procs:
                    continue
                try:
                    if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped
                        continue
                    procs[proc.pid] = ProcSample(
                        r,
                        _cpu_s(proc),
                        proc.nice(),
                        short_cmdline(proc),
                        _runqueue_wait_s(proc.pid),
                    )
                except psutil.Error:
                    continue
        busy, steal = _machine()
        return Snapshot(time.perf_counter(), procs, busy, steal, list(self.roots))


def cpu_delta(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """CPU seconds per role between two snapshots, the machine's busy and steal seconds, what
    the roles do not account for (other processes, the kernel), and each role's niceness."""
    roles: dict[str, float] = {}
    waits: dict[str, float] = {}
    nice: dict[str, int] = {}
    count: dict[str, int] = {}
    for pid, a in after.procs.items():
        b = before.procs.get(pid)
        roles[a.role] = roles.get(a.role, 0.0) + a.cpu_s - (b.cpu_s if b else 0.0)
        waits[a.role] = waits.get(a.role, 0.0) + max(0.0, a.wait_s - (b.wait_s if b else 0.0))
        nice[a.role] = max(nice.get(a.role, -20), a.nice)
        count[a.role] = count.get(a.role, 0) + 1
    gone = [pid for pid in before.procs if pid not in after.procs]
    wall = after.t - before.t
    busy = after.machine_busy_s - before.machine_busy_s
    accounted = sum(roles.values())
    return {
        "wall_s": wall,
        "cpu_s": {r: round(v, 3) for r, v in sorted(roles.items())},
        "runqueue_wait_s": {r: round(v, 3) for r, v in sorted(waits.items())},
        "processes": count,
        "nice": nice,
        "exited_during_cell": gone,
        "machine_busy_s": round(busy, 3),
        "machine_steal_s": round(after.machine_steal_s - before.machine_steal_s, 3),
        "machine_capacity_s": round(wall * (os.cpu_count() or 1), 3),
        "unaccounted_s": round(busy - accounted, 3),
    }


def process_table(snap: Snapshot) -> list[dict[str, Any]]:
    """The processes a snapshot saw (pid, role, niceness, command line), for the record."""
    return [
        {"pid": pid, "role": s.role, "nice": s.nice, "cmdline": s.cmdline}
        for pid, s in sorted(snap.procs.items())
    ]


def autogroup_enabled() -> bool | None:
    """Whether the kernel groups processes by session for CPU sharing (``sched_autogroup``):
    then niceness only orders processes of the same session, and each session gets a fair
    share of the CPUs as a whole."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def set_autogroup_nice(pid: int, nice: int) -> str:
    """Set the autogroup niceness of ``pid``'s session (raising it needs no privilege); returns
    what ``/proc/PID/autogroup`` says afterwards, or why it could not."""
    path = Path(f"/proc/{pid}/autogroup")
    try:
        path.write_text(str(nice))
        return path.read_text().strip()
    except OSError as e:
        return f"not set: {e}"
