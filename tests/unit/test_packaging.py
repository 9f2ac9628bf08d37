"""The install layout (docs/architecture.md, "Package layout"): each top-level folder is the root of
one prefixed package, the editable install is a plain list of folders that static tools read, the
wheel carries those packages and nothing else, and the serving path imports nothing that trains."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# package -> the folder it lives in (its root is that folder's parent)
ROOTS = {
    "slhf": REPO / "slhf",
    "slhf_server": REPO / "server" / "slhf_server",
    "slhf_models": REPO / "models" / "slhf_models",
    "slhf_client": REPO / "clients" / "slhf_client",
}


def _packages_on_disk() -> set[str]:
    found = set()
    for name, folder in ROOTS.items():
        for init in folder.rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(folder).parts)))
    return found


def test_each_package_imports_from_its_own_folder() -> None:
    for name, folder in ROOTS.items():
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin == str(folder / "__init__.py"), (name, spec)
    for old in ("slhf.server", "slhf.models"):
        assert importlib.util.find_spec(old) is None, old


def test_the_editable_install_is_a_plain_path_list() -> None:
    """No import hook: every line of the install's .pth is a folder (what pyright, Jedi and mypy
    follow), and together they are the packages' roots."""
    files = distribution("slhf").files or []
    (pth,) = [f for f in files if str(f).endswith(".pth")]
    lines = [line for line in Path(str(pth.locate())).read_text().splitlines() if line.strip()]
    assert all(Path(line).is_dir() and not line.startswith("import") for line in lines), lines
    assert {Path(line).resolve() for line in lines} == {f.parent for f in ROOTS.values()}


def test_the_wheel_lists_roots_not_subpackages() -> None:
    """A new subpackage needs no edit to pyproject.toml: the wheel names the four folders."""
    packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert {REPO / p for p in packages} == set(ROOTS.values())
    assert PYPROJECT["project"]["scripts"]["slhf"] == "slhf.cli:main"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check"]
    subprocess.run([*cmd, "-w", str(out), str(REPO)], check=True, timeout=600)
    (path,) = out.glob("slhf-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_the_four_packages_and_the_shipped_model(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == set(ROOTS), tops
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert in_wheel == _packages_on_disk()
    for expected in (
        "slhf/cli.py",
        "slhf/launcher.py",
        "slhf_server/app.py",
        "slhf_server/static/playground/index.html",
        "slhf_models/serving/loading.py",
        "slhf_models/trainer/trainer.py",
        "slhf_models/weights/slhf-condorcet-tiny/slhf.json",
        "slhf_models/weights/slhf-condorcet-tiny/model.safetensors",
        "slhf_models/weights/slhf-condorcet-tiny/eval/eval.json",
        "slhf_client/py.typed",
    ):
        assert expected in names, expected
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    points = wheel.read(entry).decode()
    assert "slhf = slhf.cli:main" in points
    assert "slhf_vllm_cpu_fixes = slhf_models.serving.vllm_cpu:vllm_plugin" in points


def test_serving_imports_nothing_that_trains() -> None:
    code = (
        "import sys, slhf_server.app, slhf_server.refine, slhf_server.plan; "
        "bad = sorted(m for m in sys.modules if m.startswith('slhf_models.') "
        "and not m.startswith('slhf_models.serving')); "
        "bad += [m for m in ('peft', 'accelerate', 'datasets') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
