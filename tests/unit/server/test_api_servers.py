"""The supervisor of several API processes (``SLHF_API_SERVERS``), without an engine: an API
process that exits stops the server, an engine that exits is told to every API process, signals
are forwarded, and what an API process adds to its answers and logs. The real thing, on a real
engine: tests/integration/server/test_api_servers.py."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from slhf_server import api_servers, logs
from slhf_server.api_servers import ENGINE_DEAD, ApiServerSlot, Supervisor
from slhf_server.app import create_app
from slhf_server.settings import ServerSettings
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_routes import WEIGHTS

FORK = multiprocessing.get_context("fork")  # stand-ins for API processes: nothing to import


class FakeCore:
    """``EngineCoreLaunch`` as the supervisor sees it: the engine processes' sentinels."""

    def __init__(self, *engine: Any) -> None:
        self.engine = engine
        self.watch: list[Any] = []
        self.stopped_with: float | None = None

    def sentinels(self) -> list[int]:
        return [p.sentinel for p in self.engine]

    def shutdown(self, timeout_s: float | None) -> None:
        self.stopped_with = timeout_s


def sleeper(seconds: float) -> None:
    time.sleep(seconds)


def supervisor(*children: Any, **settings: Any) -> tuple[Supervisor, list[Connection]]:
    sup = Supervisor(ServerSettings(**settings), "/nonexistent")
    inboxes = []
    for child in children:
        inbox, outbox = FORK.Pipe(duplex=False)
        child.start()
        sup.procs.append(child)
        sup.conns.append(outbox)
        inboxes.append(inbox)
    sup.starting = False
    return sup, inboxes


@pytest.fixture
def children() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for p in made:
        if p.exitcode is None:
            p.kill()
        p.join()


def test_an_api_process_that_exits_stops_the_server(children: list[Any]) -> None:
    children += [FORK.Process(target=sleeper, args=(60,)), FORK.Process(target=sleeper, args=(0,))]
    sup, _ = supervisor(*children)
    t0 = time.monotonic()
    assert sup.watch(FakeCore()) == 1  # status 1: not at reduced capacity, unnoticed
    assert time.monotonic() - t0 < 10


def test_an_engine_that_exits_is_told_to_every_api_process(children: list[Any]) -> None:
    engine = FORK.Process(target=sleeper, args=(0,))
    children += [FORK.Process(target=sleeper, args=(3,)), FORK.Process(target=sleeper, args=(60,))]
    sup, inboxes = supervisor(*children)
    engine.start()
    assert sup.watch(FakeCore(engine)) == 1  # the first API process's exit ends the watch
    engine.join()
    for inbox in inboxes:
        assert inbox.poll(0) and inbox.recv() == ENGINE_DEAD
        assert not inbox.poll(0)  # told once


def test_a_signal_is_forwarded_and_ends_the_watch(children: list[Any]) -> None:
    children += [FORK.Process(target=sleeper, args=(60,)) for _ in range(2)]
    sup, _ = supervisor(*children)
    sup.on_signal(signal.SIGTERM, None)
    for p in children:
        p.join(10)
        assert p.exitcode == -signal.SIGTERM
    assert sup.watch(FakeCore()) == 0
    assert sup.stop_at is not None


def test_a_signal_while_the_engine_starts_stops_the_start(children: list[Any]) -> None:
    children.append(FORK.Process(target=sleeper, args=(60,)))
    sup, _ = supervisor(*children)
    sup.starting = True
    with pytest.raises(api_servers._StopRequested):
        sup.on_signal(signal.SIGINT, None)


def test_the_stop_bound_is_the_one_a_single_process_promises() -> None:
    sup = Supervisor(ServerSettings(drain_grace_s=7, shutdown_timeout_s=4), "/nonexistent")
    assert sup.bound_s == 7 + 2 + 4  # docs/reliability.md, "Shutdown"


class DeadEngine:
    def __init__(self) -> None:
        self.marked = 0

    def mark_dead(self) -> None:
        self.marked += 1


def test_an_api_process_marks_its_engine_dead_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(api_servers.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    inbox, outbox = FORK.Pipe(duplex=False)
    engine = DeadEngine()
    outbox.send(ENGINE_DEAD)
    outbox.close()  # then the supervisor is gone: drain and exit
    api_servers._follow_supervisor(inbox, [engine])  # type: ignore[list-item]
    assert engine.marked == 1
    assert killed == [(os.getpid(), signal.SIGTERM)]


@pytest.fixture
def slot() -> Iterator[ApiServerSlot]:
    inbox, outbox = FORK.Pipe(duplex=False)
    yield ApiServerSlot(1, 2, "/nonexistent", FORK.Value("q", 0), inbox)
    outbox.close()


def test_every_answer_names_the_api_process(slot: ApiServerSlot) -> None:
    engine = ScriptedEngine(numbered_script, context=512)
    app = create_app(
        ServerSettings(), weights=WEIGHTS, engine_factory=lambda w, s: engine, api_server=slot
    )
    with TestClient(app) as client:
        for path in ("/health", "/ready", "/v1/models", "/nonexistent"):
            assert client.get(path).headers["x-slhf-api-server"] == "1"
        r = client.post("/v1/refine", json={"prompt": "x", "rounds": 1})
        assert r.status_code == 200 and r.headers["x-slhf-api-server"] == "1"
        assert slot.inflight.value == 0  # the shared bound got its weight back


def test_one_api_process_adds_no_header() -> None:
    engine = ScriptedEngine(numbered_script, context=512)
    app = create_app(ServerSettings(), weights=WEIGHTS, engine_factory=lambda w, s: engine)
    with TestClient(app) as client:
        assert "x-slhf-api-server" not in client.get("/health").headers


@pytest.fixture
def named() -> Iterator[None]:
    logs.name_api_server(3)
    yield
    logs._api_server.clear()


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("slhf_server", logging.INFO, __file__, 1, message, None, None)


def test_log_lines_name_the_api_process(named: None) -> None:
    line = json.loads(logs.JsonFormatter().format(record("hello")))
    assert line["api_server"] == 3 and line["pid"] == os.getpid()
    assert (
        logs.TextFormatter()
        .format(record("hello"))
        .endswith(f"hello [api_server=3 pid={os.getpid()}]")
    )


def test_one_api_process_logs_as_before() -> None:
    assert set(json.loads(logs.JsonFormatter().format(record("hello")))) == {
        "ts",
        "level",
        "logger",
        "message",
    }


def test_the_metrics_directory_is_fresh_and_ours(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(stale))  # an earlier run's: replaced
    monkeypatch.setattr(api_servers, "_replaced_metrics_dir", None)
    path = Path(api_servers.use_metrics_dir())
    try:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(path) != str(stale)
        assert path.is_dir() and not any(path.iterdir())
        assert api_servers._replaced_metrics_dir == str(stale)  # logged when serving starts
    finally:
        path.rmdir()


def test_the_stop_after_a_signal_does_not_signal_again(
    children: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second SIGTERM would cut an API process's drain short: one per signal received."""
    children.append(FORK.Process(target=sleeper, args=(60,)))
    sup, _ = supervisor(*children)
    monkeypatch.setattr("slhf_server.lifecycle.arm_exit_watchdog", lambda *a: None)
    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(sup, "exit", exit_)
    sup.on_signal(signal.SIGTERM, None)  # forwarded: the child ends (its default action)
    sent: list[int] = []
    monkeypatch.setattr(sup, "signal_children", sent.append)
    core = FakeCore()
    with pytest.raises(SystemExit):
        sup.stop(core, 0)  # type: ignore[arg-type]
    assert sent == [] and exits == [0] and children[0].exitcode == -signal.SIGTERM
    assert core.stopped_with is not None and core.stopped_with > 0  # the engine's share


def test_a_stop_without_a_signal_tells_the_api_processes(
    children: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    children.append(FORK.Process(target=sleeper, args=(60,)))
    sup, _ = supervisor(*children)
    monkeypatch.setattr("slhf_server.lifecycle.arm_exit_watchdog", lambda *a: None)
    monkeypatch.setattr(sup, "exit", sys.exit)  # the real one ends the process at once
    with pytest.raises(SystemExit) as stopped:
        sup.stop(FakeCore(), 1)  # type: ignore[arg-type]
    assert stopped.value.code == 1 and children[0].exitcode == -signal.SIGTERM
