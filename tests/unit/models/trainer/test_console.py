"""What a run shows and when it stops: preference failures, the console line, stale temporaries."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from slhf_models.preferences import CallablePreference, Unscored
from slhf_models.trainer.console import Console, PreferenceFailureError, format_line
from tests.trainer_helpers import tiny_config, tiny_trainer

PROMPTS = ["What is the map?", "Tell me about the river.", "Why does it rain?", "Name a tree."]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def judge_down(x: Any, a: str, b: str) -> float:
    return Unscored("judge http://127.0.0.1:9/v1/chat/completions: ConnectError: refused")


def test_a_dead_judge_stops_the_run_at_step_one_before_any_update(
    tiny: Path, tmp_path: Path
) -> None:
    trainer = tiny_trainer(tiny_config(tiny, tmp_path, steps=3), PROMPTS)
    trainer.preference = CallablePreference(judge_down)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    with pytest.raises(PreferenceFailureError) as e:
        trainer.train()
    message = str(e.value)
    assert message.startswith("step 1: 2 of 2 preference queries failed (100% > ")
    assert "max_preference_error_rate 0.1" in message and "ConnectError: refused" in message
    assert all(torch.equal(before[n], p) for n, p in trainer.params.items())  # no update
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_failures_within_the_limit_are_logged_as_a_rate(tiny: Path, tmp_path: Path) -> None:
    calls = []

    def flaky(x: Any, a: str, b: str) -> float:  # the first pair of each batch of 2 fails
        calls.append(x)
        return Unscored("timeout") if len(calls) % 2 else 1.0

    cfg = tiny_config(tiny, tmp_path, steps=2, max_preference_error_rate=0.5)
    trainer = tiny_trainer(cfg, PROMPTS)
    trainer.preference = CallablePreference(flaky)
    history = trainer.train()
    rates = [m["preference_error_rate"] for m in history]
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rates == [m["preference_error_rate"] for m in lines]
    assert rates == [0.5, 0.5]  # not above 0.5: the run goes on
    # a failed query counts as ½, the other as 1: the step's mean preference says so
    for m in history:
        assert m["preference"] == pytest.approx(1.0 - m["preference_error_rate"] / 2)


def test_without_a_terminal_the_run_prints_one_line_per_logging_step(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_trainer(tiny_config(tiny, tmp_path, steps=3, log_every=2), PROMPTS).train()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step ")]
    assert [x.split(" | ")[0] for x in lines] == ["step 2/3", "step 3/3"]  # and the last one
    fields = [part.split(" ")[0] for part in lines[0].split(" | ")[:-1]]
    assert fields == ["step", "loss", "pref", "kl", "entropy", "pref_err", "lr"]
    assert lines[0].endswith(" s/step")


def test_format_line_and_the_bar_on_a_terminal() -> None:
    metrics = {
        "step": 10, "loss": 0.01234, "preference": 0.5123, "sequence_kl/leader": 0.0012,
        "sequence_kl/follower": 0.0034, "entropy/leader": 2.314, "entropy/follower": 2.4,
        "preference_error_rate": 0.25, "lr": 1e-5,
    }  # fmt: skip
    assert format_line(metrics, 1000, 1.234) == (
        "step 10/1000 | loss 0.0123 | pref 0.512 | kl 0.0012/0.0034 | entropy 2.31/2.40"
        " | pref_err 25% | lr 1.00e-05 | 1.23 s/step"
    )
    stream = io.StringIO()
    with Console(total=10, start=0, log_every=10, active=True, stream=stream, tty=True) as bar:
        for step in range(1, 11):
            bar.step(metrics | {"step": step})
    text = stream.getvalue()
    assert "10/10" in text and "err=25%" in text and "step 10/1000 |" not in text
    quiet = io.StringIO()
    Console(total=10, start=0, log_every=1, active=False, stream=quiet, tty=False).step(metrics)
    assert quiet.getvalue() == ""  # processes other than the main one print nothing


def test_a_fresh_run_removes_stale_temporaries_of_an_old_run(tiny: Path, tmp_path: Path) -> None:
    stale = tmp_path / "checkpoints" / ".tmp-step-7-abc123"
    stale.mkdir(parents=True)
    (stale / "params.pt").write_bytes(b"half a file")
    tiny_trainer(tiny_config(tiny, tmp_path, steps=1), PROMPTS).train()
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]
