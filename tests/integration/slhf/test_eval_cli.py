"""``slhf eval`` end to end: a tiny random model served by ``slhf serve`` on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from slhf_models.tiny import build_tiny_model
from tests.integration.conftest import REPO, UPSTREAM_NAME, ServerProcess, server_env


def test_slhf_eval_writes_json_markdown_and_plot(tmp_path: Path, models_dir: Path) -> None:
    model = build_tiny_model(models_dir / "tiny-llama-eval", family="llama", seed=0)
    out = tmp_path / "eval"
    # one folder for model, base and other: one server, every report
    cmd = [sys.executable, "-m", "slhf.cli", "eval", "--model", str(model)]
    cmd += ["--base", str(model), "--other", str(model), "--task", "arith"]
    cmd += ["--num-prompts", "4", "--rounds", "2", "--seed", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=server_env(), capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    report = json.loads((out / "eval.json").read_text())
    names = [r["name"] for r in report["reports"]]
    assert names == ["leader_vs_base", "follower_vs_leader", "cross_family", "control"]
    points = [p[k] for p in report["curve"] for k in ("vs_round0", "vs_previous")]
    assert len(points) == 4
    for r in [*report["reports"], *points]:
        assert r["n"] == 4
        assert 0.0 <= r["low"] <= r["rate"] <= r["high"] <= 1.0
    assert "| follower_vs_leader |" in (out / "eval.md").read_text()
    assert (out / "eval_rounds.png").stat().st_size > 1000
    assert "| control |" in done.stdout.decode()


def test_slhf_eval_other_model_from_any_openai_compatible_server(
    tmp_path: Path, shared_server: ServerProcess, upstream_server: ServerProcess
) -> None:
    # --model is a running SLHF server (a URL: nothing is started), --other any OpenAI-compatible
    # server reached through /v1/chat/completions (here our own, asked for its plain Leader)
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "slhf.cli", "eval", "--model", shared_server.url]
    cmd += ["--other", upstream_server.url + "/v1", "--other-model", UPSTREAM_NAME + ":leader"]
    cmd += ["--task", "arith", "--num-prompts", "3", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=server_env(), capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    report = json.loads((out / "eval.json").read_text())
    names = [r["name"] for r in report["reports"]]
    assert names == ["follower_vs_leader", "cross_family"]
    assert all(r["n"] == 3 for r in report["reports"])


def test_slhf_eval_condorcet_adds_the_tabular_twin_and_records_the_command(
    tmp_path: Path, models_dir: Path
) -> None:
    model = build_tiny_model(models_dir / "tiny-llama-eval", family="llama", seed=0)
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "slhf.cli", "eval", "--model", str(model)]
    cmd += ["--base", str(model), "--task", "condorcet", "--tau", "0.05", "0.1"]
    cmd += ["--num-prompts", "3", "--rounds", "3", "--seed", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=server_env(), capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["task"] == "condorcet" and report["preference"] == "task:condorcet"
    assert report["command"].startswith("slhf eval --model") and "--seed 2" in report["command"]
    twin = report["twin"]
    assert (twin["tau_leader"], twin["tau_follower"]) == (0.05, 0.1)
    # a random model writes in no style: every count lands in "none"
    assert (
        twin["measured"]["leader_counts"]["none"]
        + sum(twin["measured"]["leader_counts"][s] for s in "ABC")
        == 3
    )
    assert len(twin["reach"]["measured"]) == 3 and len(twin["reach"]["measured"][0]) == 4
    assert "## Tabular twin" in (out / "eval.md").read_text()
