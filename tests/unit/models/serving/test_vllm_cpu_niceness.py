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

from slhf_models.serving.vllm_cpu import child_pids, lower_child_priority
from slhf_server.settings import ServerSettings


@pytest.fixture
def family() -> Iterator[list[psutil.Process]]:
    # a child that starts a grandchild: both are "engine processes" to the helper
    sleeper = "import time; time.sleep(60)"
    code = (
        f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); {sleeper}"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    parent = psutil.Process(proc.pid)
    for _ in range(200):
        if parent.children():
            break
        time.sleep(0.05)
    family = [parent, *parent.children(recursive=True)]
    assert len(family) == 2
    yield family
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.kill()
    proc.wait(timeout=10)


# This process may have other children (engines left by earlier tests in the same run): the
# assertions are about the fixture's two processes only.
def _nices(family: list[psutil.Process]) -> set[int]:
    return {p.nice() for p in family}


def test_children_and_grandchildren_get_the_niceness(family: list[psutil.Process]) -> None:
    own = os.nice(0)
    target = min(own + 7, 19)
    assert _nices(family) == {own} and own < 19
    changed = lower_child_priority(target)
    assert {p.pid for p in family} <= set(changed)
    assert _nices(family) == {target}
    assert os.nice(0) == own  # this process itself is unchanged


def test_zero_changes_nothing_and_priority_is_never_raised(family: list[psutil.Process]) -> None:
    before = _nices(family)
    assert lower_child_priority(0) == [] and _nices(family) == before
    lower_child_priority(9)
    changed = lower_child_priority(4)  # already lower than asked: left as it is
    assert not {p.pid for p in family} & set(changed)
    assert _nices(family) == {max(9, os.nice(0))}


def test_children_older_than_the_engine_are_left_alone(family: list[psutil.Process]) -> None:
    own = os.nice(0)
    older = child_pids()
    assert {p.pid for p in family} <= older
    assert not {p.pid for p in family} & set(lower_child_priority(min(own + 7, 19), exclude=older))
    assert _nices(family) == {own}


def test_the_setting_is_bounded_like_nice() -> None:
    assert ServerSettings().engine_niceness is None
    assert ServerSettings(engine_niceness=19).engine_niceness == 19
    for bad in (-1, 20):
        with pytest.raises(ValueError):
            ServerSettings(engine_niceness=bad)
