"""The install layout (issue 12): one ``slhf`` namespace over the folders the design names, a wheel
that carries only that namespace and the client, and a serving path that imports nothing that
trains."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FOLDERS = {"slhf": "slhf", "slhf.server": "server", "slhf.models": "models"}


def _packages_on_disk() -> set[str]:
    found = {"slhf_client"}
    for name, folder in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _packages_on_disk()
    assert setuptools["package-dir"]["slhf.server"] == "server"
    assert PYPROJECT["project"]["scripts"]["slhf"] == "slhf.cli:main"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-w", str(out), str(REPO)], check=True, timeout=300)
    (path,) = out.glob("slhf-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_one_namespace_and_the_client(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"slhf", "slhf_client"}, tops
    for expected in (
        "slhf/cli.py",
        "slhf/server/app.py",
        "slhf/server/static/playground/index.html",
        "slhf/models/serving/loading.py",
        "slhf/models/trainer/trainer.py",
        "slhf/models/weights/slhf-condorcet-tiny/slhf.json",
        "slhf/models/weights/slhf-condorcet-tiny/eval/eval.json",
    ):
        assert expected in names, expected
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "slhf = slhf.cli:main" in wheel.read(entry).decode()


def test_serving_imports_nothing_that_trains() -> None:
    code = (
        "import sys, slhf.server.app, slhf.server.refine, slhf.server.openai_plan; "
        "bad = sorted(m for m in sys.modules if m.startswith('slhf.models.') "
        "and not m.startswith('slhf.models.serving')); "
        "bad += [m for m in ('peft', 'accelerate', 'datasets') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_old_top_level_names_are_not_importable_outside_the_checkout(tmp_path: Path) -> None:
    code = "import importlib.util as u; print(u.find_spec('server'), u.find_spec('models'))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert done.stdout.split() == ["None", "None"], done.stdout + done.stderr
