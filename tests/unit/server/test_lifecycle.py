"""The teardown after a drain is bounded (docs/reliability.md, "Shutdown"): a watchdog ends the
process ``SLHF_SHUTDOWN_TIMEOUT_S`` after the drain; the engine gets half of it to stop its
processes. (The real process is measured in tests/integration/server/test_hostile.py.)"""

from __future__ import annotations

import threading
import time

from slhf_server.lifecycle import arm_exit_watchdog
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
