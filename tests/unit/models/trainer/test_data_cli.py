"""Training prompts (JSONL, parquet, chat rows, errors) and ``slhf train`` end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from slhf.cli import main
from slhf_models.preferences import CallablePreference, LLMJudgePreference
from slhf_models.serving.manifest import Manifest
from slhf_models.tiny import build_tiny_model
from slhf_models.trainer.cli import build_preference
from slhf_models.trainer.config import ConfigError
from slhf_models.trainer.data import DataError, PromptSampler, load_prompts

CHAT = [{"role": "user", "content": "Why does it rain?"}]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_prompts_load_as_strings_or_messages(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "What is the map?"}, {"prompt": CHAT}]
    assert load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows))) == ["What is the map?", CHAT]
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}]), tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet"), field="messages") == [CHAT]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "hi"}], "row 0: no 'prompt' field (fields: text)"),
        ([{"prompt": "ok"}, {"prompt": ""}], "row 1: prompt must not be empty"),
        ([{"prompt": [{"role": "assistant", "content": "x"}]}], "last message must have role"),
        ([{"prompt": 3}], "must be a string or a list of chat messages"),
        ([], "no prompts"),
    ],
)
def test_bad_rows_fail_at_load_time_with_their_number(
    tmp_path: Path, rows: list[Any], message: str
) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))


def test_bad_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_prompts(str(tmp_path / "p.csv"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_sampler_is_seeded_and_resumes_from_its_position() -> None:
    prompts = [f"p{i}" for i in range(5)]
    whole = PromptSampler(prompts, seed=1)
    batches = [whole.next_batch(3) for _ in range(4)]  # crosses epochs
    assert sorted(batches[0] + batches[1][:2]) == sorted(prompts)  # an epoch is a permutation
    resumed = PromptSampler(prompts, seed=1, position=6)
    assert [resumed.next_batch(3) for _ in range(2)] == batches[2:]


def test_the_sampler_shuffles_once_per_epoch_not_per_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import random

    prompts = [f"p{i}" for i in range(1000)]
    want = list(range(1000))
    random.Random(7 * 1_000_003 + 1).shuffle(want)  # epoch 1's order, as written in checkpoints
    shuffles = []
    real = random.Random.shuffle
    monkeypatch.setattr(
        random.Random, "shuffle", lambda self, x: shuffles.append(1) or real(self, x)
    )
    sampler = PromptSampler(prompts, seed=7)
    drawn = [sampler.next_batch(250) for _ in range(8)]  # two epochs
    assert len(shuffles) == 2
    assert drawn[4] + drawn[5] + drawn[6] + drawn[7] == [prompts[i] for i in want]


def longer_wins(x: Any, a: str, b: str) -> float:
    return float(len(a) >= len(b))


def test_preference_specs() -> None:
    assert isinstance(
        build_preference("callable:tests.unit.models.trainer.test_data_cli:longer_wins"),
        CallablePreference,
    )
    judge = build_preference("judge:http://127.0.0.1:9/v1:judge-model")
    assert isinstance(judge, LLMJudgePreference) and judge.model == "judge-model"
    assert judge.url == "http://127.0.0.1:9/v1/chat/completions"
    task = build_preference("task:arith")
    assert task(["Add 17 and 25."], ["17 plus 25 is 42."], ["17 plus 25 is 40."]) == [0.6]
    with pytest.raises(ConfigError, match="unknown task 'chess'; tasks: arith"):
        build_preference("task:chess")
    with pytest.raises(ConfigError, match="unknown kind 'magic'"):
        build_preference("magic:x")
    with pytest.raises(ConfigError, match="preference must be set"):
        build_preference(None)


def test_slhf_train_cli_trains_and_writes_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_tiny_model(tmp_path / "tiny", seed=0)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is the map?"}, {"prompt": CHAT}])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {model}\ndataset: {data}\noutput_dir: {tmp_path / 'run'}\n"
        "preference: callable:tests.unit.models.trainer.test_data_cli:longer_wins\n"
        "batch_size: 2\nmax_new_tokens: 4\nlora_r: 4\n"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(config), "steps=2", "--merged"]) == 0
    finally:
        torch.set_num_threads(threads)
    final = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert final == tmp_path / "run" / "final"
    assert Manifest.load(final).topology == "shared"
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    assert main(["train", str(config), "stepz=2"]) == 2
    assert "unknown setting 'stepz'; did you mean steps" in capsys.readouterr().err


def test_slhf_train_with_an_unreachable_judge_fails_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # once, this run exited 0 with preference 0.5 on every step
    model = build_tiny_model(tmp_path / "tiny", seed=0)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is the map?"}, {"prompt": CHAT}])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {model}\ndataset: {data}\noutput_dir: {tmp_path / 'run'}\n"
        "batch_size: 2\nmax_new_tokens: 4\nlora_r: 4\n"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", str(config), "preference=judge:http://127.0.0.1:9/v1:nomodel"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 1
    assert "slhf train: step 1: 2 of 2 preference queries failed (100% > " in err
    assert "judge http://127.0.0.1:9/v1/chat/completions: ConnectError" in err
    assert not (tmp_path / "run" / "final").exists()
