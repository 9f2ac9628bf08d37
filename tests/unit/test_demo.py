"""The demo model's recipe, data and the shipped folder (models/demo.py, issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from models import demo
from models.manifest import Manifest
from models.tasks.arith import parse_prompt, split_of
from models.tiny import SHIPPED_MODEL_DIR, default_model_dir
from models.trainer.cli import build_preference
from models.trainer.config import StackelbergConfig

REPO = Path(__file__).resolve().parents[2]


def test_the_recipe_is_a_valid_config_with_the_task_preference(tmp_path: Path) -> None:
    overrides = ["model=m", f"dataset={tmp_path}/t.jsonl", f"eval_dataset={tmp_path}/e.jsonl"]
    cfg = StackelbergConfig.from_yaml(demo.RECIPE, overrides)
    assert cfg.preference == "task:arith" and not cfg.use_lora
    assert cfg.save_every > 0  # an interrupted run resumes (make demo-model --resume)
    build_preference(cfg.preference)


def test_training_and_held_out_prompts_do_not_overlap(tmp_path: Path) -> None:
    paths = demo.build_data(tmp_path)

    def prompts(name: str) -> list[str]:
        return [json.loads(line)["prompt"] for line in paths[name].read_text().splitlines()]

    train, held_out = prompts("train"), prompts("eval")
    assert len(train) == demo.TRAIN_PROMPTS and len(held_out) == demo.EVAL_PROMPTS
    for split, rows in (("train", train), ("test", held_out)):
        assert {split_of(p.op, p.a, p.b) for p in map(parse_prompt, rows)} == {split}
    demos = [json.loads(line) for line in paths["demos"].read_text().splitlines()]
    assert {split_of(p.op, p.a, p.b) for p in (parse_prompt(r["prompt"]) for r in demos)} == {
        "train"
    }


def test_the_shipped_model_is_the_default_and_records_how_it_was_made() -> None:
    assert default_model_dir() == SHIPPED_MODEL_DIR
    manifest = Manifest.load(SHIPPED_MODEL_DIR)
    assert manifest.name == demo.SHIPPED_NAME and manifest.topology == "shared"
    record = manifest.provenance["demo"]
    assert yaml.safe_load(record["recipe"]) == yaml.safe_load(demo.RECIPE.read_text())
    assert record["timings_s"]["stackelberg"] > 0
    size = sum(f.stat().st_size for f in SHIPPED_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"the shipped folder is {size / 2**20:.1f} MiB; the budget is 20"
    report = json.loads((SHIPPED_MODEL_DIR / "eval" / "eval.json").read_text())
    names = {r["name"] for r in report["reports"]}
    assert {"leader_vs_base", "follower_vs_leader", "cross_family", "control"} <= names
    assert (SHIPPED_MODEL_DIR / "eval" / "eval.md").exists()
    assert (SHIPPED_MODEL_DIR / "eval" / "eval_rounds.png").exists()
