"""Start ``slhf serve`` as a child process on loopback and wait until it answers ``/ready``.

The one launcher of everything that runs a real server for a while: ``slhf eval`` (a weights
folder served for the run), the benchmarks (``bench/``) and the integration tests::

    with ServerProcess.start(log_path, SLHF_MODEL="path/to/weights") as server:
        httpx.post(server.url + "/v1/refine", json={"prompt": "Explain gravity"})

The server's settings are ``SLHF_*`` environment variables (or ``slhf serve`` flags in ``args``);
the host and port are the launcher's (loopback, a free port). Start-up has a deadline: a process
that exits or is not ready in time is an error whose message ends with the tail of its log.
Stopping sends SIGTERM (the server drains and exits), waits a bounded time, then kills the
process group the server leads (its engine processes too) and nothing else.

This module imports nothing heavy (no vLLM, torch or the server's app): the child does that.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 300.0
"""A cold vLLM engine on a loaded 2-core CPU takes about a minute; a GPU one loads weights too."""
STOP_TIMEOUT_S = 60.0
"""SIGTERM to exit: the server's drain grace plus its shutdown timeout fit in it by default."""
POLL_S = 0.25
TAIL_LINES = 60


class ServerStartError(RuntimeError):
    """The server exited, or was not ready in time. The message ends with its log's tail."""

    def __init__(self, message: str, *, log: Path, returncode: int | None) -> None:
        super().__init__(message)
        self.log = log
        self.returncode = returncode
        """The exit status; ``None`` when it was still running at the deadline (then stopped)."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on now (another process may still take it before we do)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without its ``SLHF_*`` variables, plus ``overrides``: a server
    started with it has exactly the settings its starter names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLHF_")}
    env.update(overrides)
    return env


def serve_command(args: Sequence[str] = ()) -> list[str]:
    """``slhf serve [args]`` run by this interpreter (so the child imports the same install)."""
    return [sys.executable, "-m", "slhf.cli", "serve", *args]


def serve_env(port: int, env: Mapping[str, str] | None = None, **settings: str) -> dict[str, str]:
    """The environment of ``slhf serve`` on ``LOOPBACK:port``: ``env`` (default ``clean_env()``),
    the host and port, then ``settings`` (``SLHF_*`` names, or any other variable)."""
    out = dict(clean_env() if env is None else env)
    out.update(SLHF_HOST=LOOPBACK, SLHF_PORT=str(port))
    out.update(settings)
    return out


class ServerProcess:
    """A running HTTP server process (normally ``slhf serve``) that answered its ready check.

    ``url`` is its base URL (no trailing slash), ``proc`` the process, ``log`` the file that holds
    its stdout and stderr, ``startup_s`` the seconds from spawn to the first ready answer. A
    context manager: leaving the ``with`` block stops it.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        url: str,
        log: Path,
        *,
        ready_path: str = "/ready",
    ) -> None:
        self.proc = proc
        self.url = url.rstrip("/")
        self.log = log
        self.ready_path = ready_path
        self.startup_s = 0.0
        self._spawned_at = time.monotonic()

    # -- start ---------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        log: Path | None = None,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        cwd: Path | str | None = None,
        timeout_s: float = START_TIMEOUT_S,
        **settings: str,
    ) -> Self:
        """``slhf serve [args]`` on loopback with ``settings`` on top of ``env`` (see
        ``serve_env``); returns once ``/ready`` answers 200.

        ``log`` defaults to a new file in the temporary directory (kept: its path is in every
        error). ``port`` defaults to a free one. Raises ``ServerStartError`` (the process is then
        stopped) when it exits first or is not ready within ``timeout_s``.
        """
        port = free_port() if port is None else port
        return cls.spawn(
            serve_command(args),
            url=f"http://{LOOPBACK}:{port}",
            log=log,
            env=serve_env(port, env, **settings),
            cwd=cwd,
            timeout_s=timeout_s,
        )

    @classmethod
    def spawn(
        cls,
        command: Sequence[str],
        *,
        url: str,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        ready_path: str = "/ready",
        timeout_s: float = START_TIMEOUT_S,
    ) -> Self:
        """Any server command (``start`` uses ``slhf serve``; the benchmarks also start vLLM's
        own server, whose check is ``/health``): run it in its own session with its output in
        ``log`` and wait until ``url + ready_path`` answers 200."""
        if log is None:
            fd, name = tempfile.mkstemp(prefix="slhf-serve-", suffix=".log")
            os.close(fd)
            log = Path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() can end its children
            )
        server = cls(proc, url, log, ready_path=ready_path)
        try:
            server.wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Poll ``url + ready_path`` until it answers 200; returns (and sets) ``startup_s``.

        Raises ``ServerStartError`` when the process exits first or ``timeout_s`` passes; the
        process is left as it is (``spawn`` stops it)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"  # the last answer to the ready check, for the timeout's message
        with httpx.Client(trust_env=False) as http:  # loopback: never through a proxy
            while True:
                if self.proc.poll() is not None:
                    raise self._error(f"exited with {self.proc.returncode} before it was ready")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._error(
                        f"was not ready after {timeout_s:g} s ({self.ready_path}: {last})"
                    )
                try:
                    r = http.get(self.url + self.ready_path, timeout=min(2.0, left))
                except httpx.HTTPError as e:
                    last = type(e).__name__
                else:
                    if r.status_code == 200:
                        self.startup_s = time.monotonic() - self._spawned_at
                        return self.startup_s
                    last = f"HTTP {r.status_code}"
                time.sleep(max(0.0, min(POLL_S, deadline - time.monotonic())))

    def _error(self, what: str) -> ServerStartError:
        args = self.proc.args
        command = shlex.join(map(str, args)) if isinstance(args, list | tuple) else str(args)
        return ServerStartError(
            f"{command} ({self.url}) {what}; last lines of {self.log}:\n{self.tail()}",
            log=self.log,
            returncode=self.proc.poll(),
        )

    # -- while it runs -------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = TAIL_LINES) -> str:
        """The last ``n`` lines of the log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    # -- stop ----------------------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, up to ``timeout_s`` for it to exit, then SIGKILL to the process group it
        leads (vLLM engine processes included). Returns the exit status (negative: the signal
        that ended it). Does nothing to a process that has already exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait()
        return self.proc.returncode

    def _kill_group(self) -> None:
        # Started with start_new_session, the server leads a group whose id is its pid, and it is
        # not reaped yet, so that id cannot belong to anything else.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.proc.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerProcess(pid={self.proc.pid}, url={self.url!r}, log={str(self.log)!r})"
