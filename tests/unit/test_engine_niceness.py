"""``lower_child_priority``: the server's engine processes yield the CPU to the API process
(``SLHF_ENGINE_NICENESS``, docs/performance.md). Real child processes, no engine."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from slhf.models.serving.vllm_cpu import lower_child_priority
from slhf.server.settings import ServerSettings


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    # a child that starts a grandchild: both are "engine processes" to the helper
    sleeper = "import time; time.sleep(60)"
    code = (
        f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); {sleeper}"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code])]
    parent = psutil.Process(procs[0].pid)
    for _ in range(200):
        if parent.children():
            break
        time.sleep(0.05)
    family = [parent, *parent.children(recursive=True)]
    yield procs
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.kill()
    for p in procs:
        p.wait(timeout=10)


def _nices() -> dict[int, int]:
    return {c.pid: c.nice() for c in psutil.Process().children(recursive=True)}


def test_children_and_grandchildren_get_the_niceness(children: list) -> None:
    assert len(_nices()) == 2 and set(_nices().values()) == {os.nice(0)}
    changed = lower_child_priority(7)
    assert sorted(changed) == sorted(_nices()) and set(_nices().values()) == {max(7, os.nice(0))}
    assert os.nice(0) == psutil.Process().nice()  # this process itself is unchanged


def test_zero_changes_nothing_and_priority_is_never_raised(children: list) -> None:
    assert lower_child_priority(0) == []
    lower_child_priority(9)
    assert lower_child_priority(4) == []  # already lower than asked: left as it is
    assert set(_nices().values()) == {max(9, os.nice(0))}


def test_the_setting_is_bounded_like_nice() -> None:
    assert ServerSettings().engine_niceness is None
    assert ServerSettings(engine_niceness=19).engine_niceness == 19
    for bad in (-1, 20):
        with pytest.raises(ValueError):
            ServerSettings(engine_niceness=bad)
