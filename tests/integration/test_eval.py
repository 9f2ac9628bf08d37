"""``slhf eval`` end to end: a tiny random model served by ``slhf serve`` on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from models.tiny import build_tiny_model
from tests.integration.conftest import REPO, UPSTREAM_NAME, ServerProcess, server_env


def test_slhf_eval_writes_json_markdown_and_plot(tmp_path: Path, models_dir: Path) -> None:
    model = build_tiny_model(models_dir / "tiny-llama-eval", family="llama", seed=0)
    out = tmp_path / "eval"
    # one folder for model, base and other: one server, every report
    cmd = [sys.executable, "-m", "server.cli", "eval", "--model", str(model)]
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
    cmd = [sys.executable, "-m", "server.cli", "eval", "--model", shared_server.url]
    cmd += ["--other", upstream_server.url + "/v1", "--other-model", UPSTREAM_NAME + ":leader"]
    cmd += ["--task", "arith", "--num-prompts", "3", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=server_env(), capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    report = json.loads((out / "eval.json").read_text())
    names = [r["name"] for r in report["reports"]]
    assert names == ["follower_vs_leader", "cross_family"]
    assert all(r["n"] == 3 for r in report["reports"])
