"""The server's and a request's life around the work: health, client disconnects, the drain.

``check_health`` and ``check_ready`` answer ``/health`` and ``/ready`` and gate admission: a dead
engine is a 503 (``engine_dead``), a draining server is not ready (``draining``).

Starlette does not cancel a non-streaming endpoint when its client goes away, and vLLM keeps
generating for a request nobody awaits. ``run_guarded`` runs the work in a task and watches the
ASGI receive channel for ``http.disconnect``: when the client leaves, the task is cancelled,
which cancels the awaited engine request (vLLM aborts it) and starts no further round.
``guarded_stream`` does the same for an SSE body.

``install_drain`` wraps uvicorn's SIGTERM handler: the first SIGTERM marks the server draining
(new requests and ``/ready`` get 503), lets admitted requests finish for ``SLHF_DRAIN_GRACE_S``,
aborts what remains, then asks uvicorn to stop -- without re-raising the signal, so the process
exits 0. A second SIGTERM goes straight to uvicorn. The teardown after the drain (uvicorn, the
engine stopping its processes, the interpreter's exit) is bounded too: a watchdog ends the
process ``SLHF_SHUTDOWN_TIMEOUT_S`` after the drain, killing its child processes first. So the
process is gone within ``SLHF_DRAIN_GRACE_S`` + 2 s (``slhf_server.admission.ABORT_WAIT_S``) +
``SLHF_SHUTDOWN_TIMEOUT_S`` of the first SIGTERM (docs/reliability.md).

``frozen_startup_heap`` is entered once everything is loaded: the objects start-up made (vLLM,
torch, transformers: ~650,000 of them) leave the garbage collector's view while the server serves,
so a full collection no longer walks them all (docs/performance.md, "Garbage collection").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

from starlette.requests import Request

from slhf_server import log_pipe
from slhf_server.admission import Admission, Ticket
from slhf_server.engine import Engine, EngineError
from slhf_server.errors import ClientDisconnectedError, ServiceUnavailableError

logger = logging.getLogger("slhf_server")

T = TypeVar("T")


@contextlib.contextmanager
def frozen_startup_heap() -> Iterator[None]:
    """While in the block, the objects alive at its start are out of the garbage collector's
    view: start-up's garbage is collected, then every object left moves to the permanent
    generation; leaving the block moves them back.

    Python runs a full collection whenever the objects that survived since the last one reach a
    quarter of the old ones, and each walks every tracked object, start-up's too: ~0.3 s of CPU
    holding the event loop, about once every few hundred requests on the shipped demo model
    (docs/performance.md, "Garbage collection"). Frozen objects are never collected, so enter it
    once the engine, service and app are built, around the serving (or the batch)."""
    gc.collect()
    gc.freeze()
    logger.debug("garbage collector: %d start-up objects frozen", gc.get_freeze_count())
    try:
        yield
    finally:
        gc.unfreeze()


async def check_health(engine: Engine) -> None:
    """Liveness: raise 503 (``engine_dead``) when the engine is dead, and (``engine_error``)
    when its check fails in a way the engine did not foresee."""
    try:
        await engine.check_health()
    except EngineError as e:
        raise ServiceUnavailableError(str(e), code="engine_dead") from e
    except Exception as e:
        logger.error("engine health check failed: %s: %s", type(e).__name__, e)
        raise ServiceUnavailableError(
            f"the engine's health check failed: {type(e).__name__}", code="engine_error"
        ) from e


async def check_ready(engine: Engine, admission: Admission) -> None:
    """Readiness: alive and not draining."""
    await check_health(engine)
    if admission.draining:
        raise ServiceUnavailableError("the server is shutting down", code="draining")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_guarded(request: Request, ticket: Ticket, work: Awaitable[T]) -> T:
    """``await work``, cancelled when the client disconnects or a drain aborts the request."""
    task: asyncio.Task[T] = asyncio.ensure_future(work)
    ticket.tasks.add(task)
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnectedError("the client disconnected; the request was aborted")
        if task.cancelled() and ticket.aborted:
            raise ServiceUnavailableError(
                "the server shut down before this request finished", code="shutdown"
            )
        return task.result()
    finally:
        watcher.cancel()
        task.cancel()
        ticket.tasks.discard(task)


async def guarded_stream(
    request: Request, ticket: Ticket, lines: AsyncIterator[str]
) -> AsyncIterator[str]:
    """``lines`` as a response body: the ticket is released when the stream ends, and the
    stream is cancelled when the client disconnects or a drain aborts it."""
    me = asyncio.current_task()
    watcher = asyncio.create_task(_wait_disconnect(request))
    if me is not None:
        ticket.tasks.add(me)
        watcher.add_done_callback(lambda w: None if w.cancelled() else me.cancel())
    try:
        async for line in lines:
            yield line
    finally:
        watcher.cancel()
        if me is not None:
            ticket.tasks.discard(me)
        ticket.release()
        close = getattr(lines, "aclose", None)
        if close is not None:
            await close()


SignalHandler = Callable[[int, FrameType | None], Any]


def _stop_uvicorn(previous: object, sig: int) -> None:
    """Ask uvicorn to exit. Setting ``should_exit`` (instead of calling its handler) keeps it
    from re-raising SIGTERM after shutdown, so the exit status is 0."""
    import uvicorn

    server = getattr(previous, "__self__", None)
    if isinstance(server, uvicorn.Server):
        server.should_exit = True
    elif callable(previous):
        previous(sig, None)
    else:
        raise SystemExit(0)


def _kill_children() -> None:
    """SIGKILL this process's child processes (an engine's), if psutil can list them."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - vLLM depends on psutil
        return
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


def exit_process(code: int) -> None:
    """Flush the logs, kill what is left of the child processes, and end the process now --
    without the interpreter's teardown (vLLM's and multiprocessing's exit handlers took seconds
    after the engine had stopped, and a watchdog thread cannot run once that teardown starts)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _kill_children()
    log_pipe.close()  # the lines still in the JSON log pipe (slhf_server.log_pipe)
    os._exit(code)


def _force_exit() -> None:
    exit_process(0)


def arm_exit_watchdog(
    timeout_s: float, exit_now: Callable[[], None] = _force_exit
) -> threading.Timer:
    """End the process in ``timeout_s`` unless it has exited by then (a daemon timer)."""

    def fire() -> None:
        logger.warning("shutdown took over %.1f s (SLHF_SHUTDOWN_TIMEOUT_S); exiting", timeout_s)
        exit_now()

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def install_drain(
    admission: Admission, grace_s: float, shutdown_timeout_s: float | None = None
) -> Callable[[], None]:
    """Wrap the current SIGTERM handler (uvicorn's) with a drain; returns an uninstaller.
    With ``shutdown_timeout_s``, the process ends that long after the drain at the latest.

    A no-op outside the main thread (e.g. under TestClient).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    running: set[asyncio.Task[None]] = set()  # keeps the drain task referenced

    async def drain() -> None:
        logger.info("SIGTERM: draining for up to %.1f s", grace_s)
        aborted = await admission.drain(grace_s)
        logger.info("drained; aborted %d request(s) still running after the grace", aborted)
        if shutdown_timeout_s is not None:
            arm_exit_watchdog(shutdown_timeout_s)
        _stop_uvicorn(previous, signal.SIGTERM)

    def handler(sig: int, frame: FrameType | None) -> None:
        if admission.draining:  # a second SIGTERM: no more patience
            if callable(previous):
                previous(sig, frame)
            return
        admission.draining = True
        loop.call_soon_threadsafe(lambda: running.add(loop.create_task(drain())))

    signal.signal(signal.SIGTERM, handler)

    def uninstall() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    return uninstall
