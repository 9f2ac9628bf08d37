"""Fail when the running environment differs from an install lock (`make check-lock`).

Usage: ``python requirements/check_lock.py requirements/cpu-dev.txt``. Compares every installed
distribution (except pip and this project) with the lock's ``name==version`` lines and prints
what is missing, extra or at another version. Standard library only, so it runs before anything
else is importable.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

IGNORED = {"pip", "slhf"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name or not version:
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    return {name: version for name, version in found.items() if name not in IGNORED}


def differences(lock: dict[str, str], env: dict[str, str]) -> list[str]:
    lines = [f"missing: {n}=={v}" for n, v in sorted(lock.items()) if n not in env]
    lines += [f"not in the lock: {n}=={v}" for n, v in sorted(env.items()) if n not in lock]
    lines += [
        f"version: {n} is {env[n]}, the lock says {v}"
        for n, v in sorted(lock.items())
        if n in env and env[n] != v
    ]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_lock.py LOCKFILE", file=sys.stderr)
        return 2
    path = Path(argv[0])
    lock = read_lock(path)
    problems = differences(lock, installed())
    if problems:
        print(f"the environment differs from {path} ({len(problems)}):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print(
            "fix: `make clean install-dev` to install the lock again; after changing "
            "pyproject.toml's dependencies, `make lock` and commit requirements/",
            file=sys.stderr,
        )
        return 1
    print(f"environment matches {path} ({len(lock)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
