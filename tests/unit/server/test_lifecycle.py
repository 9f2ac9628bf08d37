"""The teardown after a drain is bounded (docs/reliability.md, "Shutdown"): a watchdog ends the
process ``SLHF_SHUTDOWN_TIMEOUT_S`` after the drain; the engine gets half of it to stop its
processes. (The real process is measured in tests/integration/server/test_hostile.py.)"""

from __future__ import annotations

import gc
import threading
import time
import weakref

from slhf_server.lifecycle import arm_exit_watchdog, frozen_startup_heap
from slhf_server.settings import ServerSettings


def test_the_watchdog_exits_after_its_timeout() -> None:
    fired = threading.Event()
    t0 = time.monotonic()
    timer = arm_exit_watchdog(0.2, exit_now=fired.set)
    assert timer.daemon  # never keeps a process alive that exits on its own
    assert fired.wait(timeout=10)
    assert time.monotonic() - t0 >= 0.19


def test_a_cancelled_watchdog_does_not_fire() -> None:
    fired = threading.Event()
    arm_exit_watchdog(0.2, exit_now=fired.set).cancel()
    assert not fired.wait(timeout=0.5)


def test_the_shutdown_timeout_is_a_setting() -> None:
    assert ServerSettings().shutdown_timeout_s == 10.0
    assert ServerSettings(shutdown_timeout_s=3).shutdown_timeout_s == 3.0


def test_the_startup_heap_is_frozen_while_serving_and_thawed_after() -> None:
    """Objects alive when the server starts serving leave the collector's view (a full
    collection then walks only what serving made); shutdown gives them back."""
    from fastapi.testclient import TestClient

    from slhf_server.app import create_app
    from tests.fakes import ScriptedEngine, numbered_script
    from tests.unit.server.test_routes import WEIGHTS

    engine = ScriptedEngine(numbered_script, context=512)
    app = create_app(
        ServerSettings(), weights=WEIGHTS, engine_factory=lambda w, s: engine, freeze_heap=True
    )
    assert gc.get_freeze_count() == 0
    with TestClient(app) as client:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the interpreter's, pydantic's, FastAPI's objects at least
        assert client.post("/v1/refine", json={"prompt": "hi"}).status_code == 200
        # frozen once, not per request (frozen objects can still be freed by reference counting)
        assert gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0
    # a fake engine's app (the unit tests' hundreds) does not pay the collection by default
    with TestClient(create_app(weights=WEIGHTS, engine_factory=lambda w, s: engine)):
        assert gc.get_freeze_count() == 0


def test_frozen_startup_heap_collects_startup_garbage_first() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    garbage = weakref.ref(Cycle())  # unreachable, in a reference cycle: only gc frees it
    with frozen_startup_heap():
        assert garbage() is None
        kept = Cycle()
        assert gc.is_tracked(kept)
    assert gc.get_freeze_count() == 0
