"""Which distributed mode a launch gives the trainer (models/slhf_models/trainer/distributed.py),
from the environment `accelerate launch` derives from each shipped recipe. The modes themselves
run on two CPU processes in tests/integration/models/trainer/test_distributed.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from accelerate.utils import DistributedType

from slhf_models.trainer.distributed import DistributedError, mode_of

REPO = Path(__file__).resolve().parents[4]
RECIPES = REPO / "recipes" / "accelerate"


def launch_env(recipe: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file RECIPE` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(recipe), "-m", "slhf_models.trainer.cli", "x"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def accelerator(processes: int, kind: DistributedType = DistributedType.MULTI_CPU) -> Any:
    return SimpleNamespace(distributed_type=kind, num_processes=processes)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)


def test_only_the_tested_recipes_ship() -> None:
    # DeepSpeed's engine steps the optimizer inside backward(): not supported, not shipped
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == ["fsdp.yaml", "multi_gpu.yaml"]


@pytest.mark.parametrize(("recipe", "mode"), [("fsdp.yaml", "fsdp2"), ("multi_gpu.yaml", "ddp")])
def test_each_recipe_gives_the_mode_its_two_process_test_runs(
    monkeypatch: pytest.MonkeyPatch, recipe: str, mode: str
) -> None:
    env = launch_env(RECIPES / recipe)
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD"):
        if name in env:
            monkeypatch.setenv(name, env[name])
    if mode == "fsdp2":
        assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    assert mode_of(accelerator(2)) == mode
    assert mode_of(accelerator(1)) == "none"


def test_fsdp1_and_deepspeed_are_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(DistributedError, match="set fsdp_version: 2"):
        mode_of(accelerator(2))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(DistributedError, match="DeepSpeed is not supported"):
        mode_of(accelerator(2, DistributedType.DEEPSPEED))
