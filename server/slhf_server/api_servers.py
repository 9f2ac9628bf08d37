"""Several API processes sharing one engine (``SLHF_API_SERVERS`` > 1), as ``vllm serve
--api-server-count`` does: on a GPU one API process's CPU (HTTP, JSON, templates, detokenized
outputs) runs out before the engine does.

``slhf serve`` then becomes a supervisor that serves no request itself:

1. ``use_metrics_dir`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before
   prometheus_client is imported: each API process writes its metrics there and whichever
   answers ``/metrics`` reads them all (``slhf_server.metrics``). The supervisor removes it.
2. The listening socket is bound once, as with one process (``preflight.bind_socket``); every
   API process inherits it and accepts on it, and the kernel gives each connection to one of
   them.
3. The engine core starts once, with one pair of ZMQ endpoints per API process
   (``vllm_engine.launch_engine_core``); the API processes (``multiprocessing``'s "spawn": fresh
   interpreters) start meanwhile, each building its own app with its own ``AsyncLLM`` client
   of that engine (``VllmEngine.attach``) and running uvicorn on the socket.
4. It supervises: an API process that exits while the server is not stopping stops the others
   and the engine, and the supervisor exits 1 (never serving at reduced capacity unnoticed). An
   engine core that exits is told to every API process, which then answer 503 (``engine_dead``)
   and fail ``/health``, as one process does when its own engine dies.
5. SIGTERM (or SIGINT) is forwarded to every API process, which drains as one process does
   (``lifecycle.install_drain``); then the engine stops. The supervisor is gone within the
   bound one process promises, ``SLHF_DRAIN_GRACE_S`` + 2 s + ``SLHF_SHUTDOWN_TIMEOUT_S``
   (docs/reliability.md): API processes still running ``SLHF_SHUTDOWN_TIMEOUT_S`` / 2 before
   it are killed, the engine gets what is left, and a watchdog ends everything at the bound.

Admission is shared (``admission.SharedWeight``): the processes together admit at most
``SLHF_MAX_INFLIGHT_GENERATIONS``. Every response carries ``x-slhf-api-server: <index>`` and
every log line the API process's index and pid.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from slhf_models.serving.loading import ServedWeights
from slhf_server import logs
from slhf_server.settings import ServerSettings

if TYPE_CHECKING:
    from slhf_server.admission import SharedWeight
    from slhf_server.vllm_engine import EngineCoreLaunch, VllmEngine

logger = logging.getLogger("slhf_server")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEADER = b"x-slhf-api-server"
"""The response header naming the API process (its index) that answered."""
ENGINE_DEAD = "engine_dead"
"""The supervisor's message to the API processes when the engine core exits."""
POLL_S = 0.5


@dataclass
class ApiServerSlot:
    """What one API process gets from the supervisor besides the settings and the socket."""

    index: int
    count: int
    metrics_dir: str
    """``PROMETHEUS_MULTIPROC_DIR``: where every API process writes its metrics."""
    inflight: SharedWeight
    """The admitted weight of all API processes (one bound for them all)."""
    supervisor: Connection
    """Messages from the supervisor (``ENGINE_DEAD``); closed when the supervisor is gone."""

    def header(self) -> tuple[bytes, bytes]:
        return HEADER, str(self.index).encode()


def use_metrics_dir() -> str:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (the API processes inherit it)
    and return it. Call before anything imports prometheus_client, so metrics recorded in this
    process too go to files; one set before (by whoever started ``slhf serve``) is replaced,
    since metrics left there by an earlier run would be counted again."""
    global _replaced_metrics_dir
    _replaced_metrics_dir = os.environ.get(METRICS_DIR_ENV) or None
    path = tempfile.mkdtemp(prefix="slhf-metrics-")
    os.environ[METRICS_DIR_ENV] = path
    return path


_replaced_metrics_dir: str | None = None
"""The ``PROMETHEUS_MULTIPROC_DIR`` that ``use_metrics_dir`` replaced (logged once logging runs)."""


# -- an API process ------------------------------------------------------------------------------


def _follow_supervisor(conn: Connection, engines: list[VllmEngine]) -> None:
    """In an API process (a thread): mark the engine dead when the supervisor says it exited;
    drain and exit when the supervisor is gone."""
    try:
        while True:
            if conn.recv() == ENGINE_DEAD:
                logger.error("the engine core exited; every request gets a 503 from now on")
                for engine in engines:
                    engine.mark_dead()
    except (EOFError, OSError):
        logger.error("the supervisor process is gone; shutting down")
        os.kill(os.getpid(), signal.SIGTERM)


def run_api_server(
    slot: ApiServerSlot,
    settings: ServerSettings,
    weights: ServedWeights,
    sock: socket.socket,
    client: dict[str, Any],
) -> None:
    """One API process (the target of the supervisor's ``multiprocessing`` processes): the app
    on its own client of the shared engine, served by uvicorn on the inherited socket."""
    from slhf_server.app import create_app, run_app
    from slhf_server.lifecycle import exit_process
    from slhf_server.logs import configure_logging

    logs.name_api_server(slot.index)
    log_config = configure_logging(settings.log_format, settings.log_level)
    engines: list[VllmEngine] = []

    def attach(served: ServedWeights, s: ServerSettings) -> VllmEngine:
        from slhf_server.vllm_engine import VllmEngine

        engines.append(VllmEngine.attach(served, s, client))
        return engines[-1]

    threading.Thread(
        target=_follow_supervisor,
        args=(slot.supervisor, engines),
        name="slhf-supervisor",
        daemon=True,
    ).start()
    logger.info("API process %d of %d starting", slot.index, slot.count)
    app = create_app(
        settings, weights=weights, engine_factory=attach, api_server=slot, freeze_heap=True
    )
    started = run_app(app, settings, log_config, sock)
    exit_process(0 if started else 3)


# -- the supervisor ------------------------------------------------------------------------------


class _StopRequested(Exception):
    """SIGTERM or SIGINT while the engine was still starting."""


class Supervisor:
    """Starts the API processes on the engine core, watches them, and stops everything."""

    def __init__(self, settings: ServerSettings, metrics_dir: str) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.stop_at: float | None = None
        """When the first SIGTERM (or SIGINT) came; None until then."""
        self.starting = True
        self.forwarded = False
        """Whether the API processes got a SIGTERM."""

    @property
    def bound_s(self) -> float:
        """From the first SIGTERM to the end of every process (docs/reliability.md)."""
        from slhf_server.admission import ABORT_WAIT_S  # (imports prometheus_client)

        s = self.settings
        return s.drain_grace_s + ABORT_WAIT_S + s.shutdown_timeout_s

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        first = self.stop_at is None
        if first:
            self.stop_at = time.monotonic()
            logger.info(
                "%s: stopping the %d API processes (bound %.1f s)",
                signal.Signals(sig).name,
                len(self.procs),
                self.bound_s,
            )
        self.signal_children(signal.SIGTERM)  # a second one: they stop at once
        if first and self.starting:
            raise _StopRequested

    def signal_children(self, sig: int) -> None:
        self.forwarded = True
        for p in self.procs:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def start(
        self,
        core: EngineCoreLaunch,
        weights: ServedWeights,
        sock: socket.socket,
        inflight: SharedWeight,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        count = len(core.clients)
        for i, client in enumerate(core.clients):
            mine, theirs = ctx.Pipe(duplex=False)
            slot = ApiServerSlot(i, count, self.metrics_dir, inflight, mine)
            p = ctx.Process(
                target=run_api_server,
                name=f"slhf-api-{i}",
                args=(slot, self.settings, weights, sock, client),
            )
            p.start()
            mine.close()
            self.procs.append(p)
            self.conns.append(theirs)
        core.watch = self.procs

    def watch(self, core: EngineCoreLaunch) -> int:
        """Until a signal: 1 when an API process exits; tell them all if the engine exits."""
        children = {p.sentinel: p for p in self.procs}
        engine = set(core.sentinels())
        while self.stop_at is None:
            for ready in wait([*children, *engine], timeout=POLL_S):
                if ready in engine:
                    engine.clear()
                    logger.error(
                        "the engine core exited; the API processes answer 503 (engine_dead) "
                        "and fail /health until the server is restarted"
                    )
                    for conn in self.conns:
                        with contextlib.suppress(OSError):
                            conn.send(ENGINE_DEAD)
                elif isinstance(ready, int) and ready in children and self.stop_at is None:
                    p = children[ready]
                    p.join(0)
                    logger.error(
                        "API process %s (pid %s) exited with %s; stopping the server",
                        p.name,
                        p.pid,
                        p.exitcode,
                    )
                    return 1
        return 0

    def stop(self, core: EngineCoreLaunch | None, code: int) -> NoReturn:
        """Drain and stop the API processes, then the engine; end this process with ``code``
        within ``bound_s`` of the first signal (now, if none came)."""
        if self.stop_at is None:
            self.stop_at = time.monotonic()
        end = self.stop_at + self.bound_s
        from slhf_server.lifecycle import arm_exit_watchdog

        arm_exit_watchdog(max(0.1, end - time.monotonic()), lambda: self.exit(code))
        if not self.forwarded:  # (a second SIGTERM would end their drain)
            self.signal_children(signal.SIGTERM)
        children_by = end - self.settings.shutdown_timeout_s / 2
        for p in self.procs:
            p.join(max(0.0, children_by - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                logger.warning("API process %s (pid %s) still runs: killed", p.name, p.pid)
                p.kill()
                p.join(1.0)
        if core is not None:
            core.shutdown(max(0.5, end - time.monotonic() - 1.0))
        logger.info("stopped %d API processes and the engine", len(self.procs))
        self.exit(code)

    def exit(self, code: int) -> NoReturn:
        from prometheus_client import multiprocess

        from slhf_server.lifecycle import exit_process

        for p in self.procs:
            if p.pid is not None:
                with contextlib.suppress(Exception):
                    multiprocess.mark_process_dead(p.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        exit_process(code)
        raise SystemExit(code)  # not reached: exit_process ends the process


def serve(
    settings: ServerSettings, weights: ServedWeights, sock: socket.socket, metrics_dir: str
) -> NoReturn:
    """``slhf serve`` with ``settings.api_servers`` API processes on one engine core; does not
    return. Exit status: 0 after a signal, 1 when an API process died, 3 when the engine or an
    API process failed to start."""
    from slhf_models.serving import vllm_cpu
    from slhf_server.vllm_engine import launch_engine_core

    if _replaced_metrics_dir is not None:
        logger.warning(
            "%s=%s is not used: the API processes keep their metrics in %s, made for this run",
            METRICS_DIR_ENV,
            _replaced_metrics_dir,
            metrics_dir,
        )
    sup = Supervisor(settings, metrics_dir)
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    inflight = multiprocessing.get_context("spawn").Value("q", 0)
    older = vllm_cpu.child_pids()
    core: EngineCoreLaunch | None = None
    logger.info(
        "starting the engine on %s (topology %s) for %d API processes",
        weights.leader.model,
        weights.topology,
        settings.api_servers,
    )
    try:
        with launch_engine_core(weights, settings, settings.api_servers) as core:
            sup.start(core, weights, sock, inflight)
        sup.starting = False
    except _StopRequested:
        sup.stop(core, 0)
    except Exception as e:
        logger.error("the server did not start: %s: %s", type(e).__name__, e)
        sup.stop(core, 3)
    assert core is not None
    sock.close()  # the API processes hold their own
    api = {p.pid for p in sup.procs if p.pid is not None}
    if reniced := vllm_cpu.lower_child_priority(settings.engine_niceness, exclude=older | api):
        logger.info(
            "engine processes %s run at niceness %s (SLHF_ENGINE_NICENESS)",
            reniced,
            settings.engine_niceness if settings.engine_niceness is not None else 10,
        )
    logger.info(
        "%d API processes (pids %s) share the engine on %s:%s",
        len(sup.procs),
        ", ".join(str(p.pid) for p in sup.procs),
        settings.host,
        settings.port,
    )
    sup.stop(core, sup.watch(core))
