"""The demo model's recipe, data and the shipped folder (models/slhf_models/demo.py,
docs/demo.md)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from slhf_models import demo
from slhf_models.serving.loading import SHIPPED_MODEL_DIR, default_model_dir
from slhf_models.serving.manifest import Manifest
from slhf_models.tasks.condorcet import check, parse_prompt, split_of
from slhf_models.trainer.cli import build_preference
from slhf_models.trainer.config import StackelbergConfig

REPO = Path(__file__).resolve().parents[3]


def test_the_recipe_uses_the_condorcet_task_and_the_corrected_objective(tmp_path: Path) -> None:
    overrides = ["model=m", f"dataset={tmp_path}/t.jsonl", f"eval_dataset={tmp_path}/e.jsonl"]
    cfg = StackelbergConfig.from_yaml(demo.RECIPE, overrides)
    assert cfg.preference == f"task:{demo.TASK}" == "task:condorcet" and not cfg.use_lora
    assert cfg.kl_estimator == "k1" and cfg.leader_objective == "full"
    assert cfg.save_every > 0  # an interrupted run resumes (make demo-model --resume)
    assert cfg.max_new_tokens >= demo.SAMPLING.max_tokens  # served answers as long as trained
    build_preference(cfg.preference)


def test_training_and_held_out_prompts_do_not_overlap(tmp_path: Path) -> None:
    paths = demo.build_data(tmp_path)

    def rows(name: str) -> list[dict[str, str]]:
        return [json.loads(line) for line in paths[name].read_text().splitlines()]

    train, held_out = [r["prompt"] for r in rows("train")], [r["prompt"] for r in rows("eval")]
    assert len(train) == demo.TRAIN_PROMPTS and len(held_out) == demo.EVAL_PROMPTS
    for split, prompts in (("train", train), ("test", held_out)):
        assert {split_of(parse_prompt(x)) for x in prompts} == {split}
    demos = rows("demos")
    assert len(demos) == demo.DEMOS
    assert {split_of(parse_prompt(r["prompt"])) for r in demos} == {"train"}
    assert all(check(r["prompt"], r["answer"]).style == r["style"] for r in demos)


def test_the_shipped_model_is_the_default_and_records_how_it_was_made() -> None:
    assert SHIPPED_MODEL_DIR.name == demo.SHIPPED_NAME
    assert default_model_dir() == SHIPPED_MODEL_DIR
    manifest = Manifest.load(SHIPPED_MODEL_DIR)
    assert manifest.name == demo.SHIPPED_NAME and manifest.topology == "shared"
    record = manifest.provenance["demo"]
    assert yaml.safe_load(record["recipe"]) == yaml.safe_load(demo.RECIPE.read_text())
    assert record["task"] == demo.TASK and record["timings_s"]["stackelberg"] > 0
    size = sum(f.stat().st_size for f in SHIPPED_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"the shipped folder is {size / 2**20:.1f} MiB; the budget is 20"


def test_the_committed_report_can_be_rerun_and_holds_the_twin() -> None:
    report = json.loads((SHIPPED_MODEL_DIR / "eval" / "eval.json").read_text())
    names = {r["name"] for r in report["reports"]}
    assert {"leader_vs_base", "follower_vs_leader", "cross_family", "control"} <= names
    assert report["command"].startswith("slhf eval ") and "--task condorcet" in report["command"]
    assert report["task"] == "condorcet" and report["preference"] == "task:condorcet"
    assert report["n_prompts"] >= 256 and report["rounds"] == 4 and "seed" in report
    assert set(report["models"]) == {"model", "base", "other"}
    twin = report["twin"]
    assert len(twin["measured"]["follower"]) == 3 and len(twin["reach"]["measured"]) == 3
    assert (twin["tau_leader"], twin["tau_follower"]) == (
        yaml.safe_load(demo.RECIPE.read_text())["tau_leader"],
        yaml.safe_load(demo.RECIPE.read_text())["tau_follower"],
    )
    assert "Tabular twin" in (SHIPPED_MODEL_DIR / "eval" / "eval.md").read_text()
    assert (SHIPPED_MODEL_DIR / "eval" / "eval_rounds.png").stat().st_size > 1000
