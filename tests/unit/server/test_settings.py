"""The settings table (docs/configuration.md) is generated from ServerSettings and never stale;
the bounds of a setting."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydantic import ValidationError

from slhf_server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[3]


def load_generator():  # docs/ is not a package: load the script as a module
    spec = importlib.util.spec_from_file_location("gen_settings", REPO / "docs" / "gen_settings.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_block_is_the_generated_table() -> None:
    gen = load_generator()
    assert gen.generated_block((REPO / "docs" / "configuration.md").read_text()) == gen.render(), (
        "docs/configuration.md settings are stale: run `python docs/gen_settings.py --write`"
    )


def test_every_setting_has_a_row_with_its_default() -> None:
    table = load_generator().render()
    for name, field in ServerSettings.model_fields.items():
        assert f"| `SLHF_{name.upper()}` |" in table
        if field.default is not None and not isinstance(field.default, bool):
            assert f"`{field.default}`" in table


def test_schema_compile_timeout_is_a_bounded_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings().schema_compile_timeout_s == 0.2
    monkeypatch.setenv("SLHF_SCHEMA_COMPILE_TIMEOUT_S", "0.5")
    assert ServerSettings().schema_compile_timeout_s == 0.5
    for bad in (0, -1, 5.5):
        with pytest.raises(ValidationError, match="schema_compile_timeout_s"):
            ServerSettings(schema_compile_timeout_s=bad)


@pytest.mark.parametrize("value", ["1", "2", "64"])
def test_api_servers_takes_one_to_64_processes(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLHF_API_SERVERS", value)
    assert ServerSettings().api_servers == int(value)


@pytest.mark.parametrize("value", ["0", "-1", "65", "1.5", "two"])
def test_api_servers_refuses_what_is_not_a_sane_process_count(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLHF_API_SERVERS", value)
    with pytest.raises(ValidationError, match="api_servers"):
        ServerSettings()


def test_one_api_process_is_the_default() -> None:
    assert ServerSettings.model_fields["api_servers"].default == 1
