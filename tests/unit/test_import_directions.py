"""The allowed import directions (docs/architecture.md, "Import directions"), read from the source
with ``ast``: every ``import``, at module level or inside a function, of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {
    "slhf": REPO / "slhf",
    "slhf_server": REPO / "server" / "slhf_server",
    "slhf_models": REPO / "models" / "slhf_models",
    "slhf_client": REPO / "clients" / "slhf_client",
}
OURS = tuple(FOLDERS)

# module prefix -> the prefixes of ours it may import (its own package is always allowed)
ALLOWED: dict[str, tuple[str, ...]] = {
    "slhf_client": (),
    "slhf_models.serving": (),
    "slhf_models": ("slhf_models",),
    "slhf_server": ("slhf_models.serving",),
    "slhf": ("slhf_server", "slhf_models", "slhf_client"),
}
# the modules that may import vLLM (the server's engine and its engine flags; the models' CPU
# fixes and vLLM rollouts)
VLLM_IMPORTERS = {
    "slhf_server.vllm_engine",
    "slhf_server.vllm_formats",
    "slhf_server.engine_flags",
    "slhf_models.serving.vllm_cpu",
    "slhf_models.trainer.vllm_rollouts",
}


def _modules() -> dict[str, Path]:
    found = {}
    for name, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                package = module.split(".")
                is_package = path.name == "__init__.py"
                base = package[: len(package) - node.level + (1 if is_package else 0)]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _rule(module: str) -> tuple[str, tuple[str, ...]]:
    prefix = max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)
    return prefix, ALLOWED[prefix]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module: str) -> None:
    own, allowed = _rule(module)
    bad = sorted(
        name
        for name in _imports(module, MODULES[module])
        if name.split(".")[0] in OURS
        and not _under(name, own)
        and not any(_under(name, a) for a in allowed)
    )
    assert not bad, f"{module} ({own}) may import only {own} and {allowed or 'nothing else'}: {bad}"


def test_only_the_engine_modules_import_vllm() -> None:
    importers = {
        m for m, path in MODULES.items() if any(_under(n, "vllm") for n in _imports(m, path))
    }
    assert importers == VLLM_IMPORTERS


def test_the_rules_catch_an_upward_import() -> None:
    """The checker itself: an import from the models into the server is seen and refused."""
    tree = ast.parse("def f():\n    from slhf_server.launcher import X\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert node.module is not None
    own, allowed = _rule("slhf_models.eval")
    assert not _under(node.module, own) and not any(_under(node.module, a) for a in allowed)
