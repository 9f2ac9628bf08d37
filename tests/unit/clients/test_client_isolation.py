"""The client package stands alone: importing it pulls in neither the server nor torch/vllm."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CLIENTS = REPO / "clients"
FORBIDDEN = ("server", "models", "torch", "vllm", "transformers", "fastapi", "pydantic")


def test_importing_the_client_and_its_cli_loads_no_server_or_torch() -> None:
    code = (
        "import json, sys\n"
        "import slhf_client, slhf_client.cli, slhf_client.async_client\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps(bad))\n"
    )
    # Run from clients/ with only clients/ on the path, as after `pip install ./clients`.
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=CLIENTS,
        env={"PYTHONPATH": str(CLIENTS), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == []


def test_client_sources_import_only_the_standard_library_and_httpx() -> None:
    allowed_third_party = {"httpx"}
    for path in (CLIENTS / "slhf_client").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in allowed_third_party, (
                    f"{path.relative_to(REPO)} imports {name}"
                )


def test_standalone_pyproject_needs_only_httpx() -> None:
    import tomllib

    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["httpx"]
