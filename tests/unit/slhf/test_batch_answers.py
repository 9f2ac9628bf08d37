"""Another model's answers -> a batch file -> the refined answers' win rate (slhf.batch_answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slhf.batch import ENDPOINTS, scan_input
from slhf.batch_answers import AnswersError, main, read_answers
from slhf_models.tasks import condorcet
from slhf_server.openai_protocol import ChatCompletionRequest

CLEAN_C = (
    "Once upon a time the baker found 3 red things: red apple, red river and red map. The end."
)
CLEAN_A = "Here is a fact: the baker has 3 red things: red apple, red river and red map."
PROMPT = "Name 3 red things the baker has."


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_build_writes_a_valid_batch_that_refines_each_given_answer(tmp_path: Path) -> None:
    answers = write(
        tmp_path / "answers.jsonl",
        [
            {"id": "q1", "prompt": PROMPT, "answer": CLEAN_A, "style": "A"},
            {"prompt": [{"role": "user", "content": PROMPT}], "answer": CLEAN_C},
        ],
    )
    batch = tmp_path / "batch.jsonl"
    argv = ["build", str(answers), "-o", str(batch), "--rounds", "2", "--max-tokens", "48"]
    assert main([*argv, "--seed", "10", "--trace"]) == 0
    assert scan_input(batch) == ["q1", "2"]
    lines = [json.loads(x) for x in batch.read_text().splitlines()]
    for line, answer, seed in zip(lines, (CLEAN_A, CLEAN_C), (10, 11), strict=True):
        assert line["url"] in ENDPOINTS and line["method"] == "POST"
        body = ChatCompletionRequest.model_validate(line["body"])  # the route's own model
        assert body.refinement is not None and body.refinement.response == answer
        assert (body.refinement.rounds, body.max_tokens, body.seed) == (2, 48, seed)
        assert body.refinement.return_trace and body.messages[0].content == PROMPT


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": PROMPT}, "'answer' must be a non-empty text"),
        ({"answer": "x"}, "'prompt' must be"),
        ([1], "not a JSON object"),
    ],
)
def test_a_bad_answers_line_is_named(tmp_path: Path, row: object, message: str) -> None:
    with pytest.raises(AnswersError, match=message):
        read_answers(write(tmp_path / "a.jsonl", [row]))


def test_win_rate_scores_refined_against_given_with_the_eval_preference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = write(
        tmp_path / "answers.jsonl",
        [{"id": str(i), "prompt": PROMPT, "answer": CLEAN_A} for i in range(4)],
    )

    def result(cid: str, status: int, text: str) -> dict[str, object]:
        body = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        return {"custom_id": cid, "response": {"status_code": status, "body": body}, "error": None}

    # three refined into style C (beats A for 2 of 3 groups), one failed
    rows = [result("0", 200, CLEAN_C), result("1", 200, CLEAN_C), result("2", 200, CLEAN_C)]
    rows.append({"custom_id": "3", "response": None, "error": {"code": "x", "line": 4}})
    results = write(tmp_path / "results.jsonl", rows)
    assert main(["win-rate", str(answers), str(results), "--preference", "task:condorcet"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = condorcet.TaskPreference()([PROMPT], [CLEAN_C], [CLEAN_A])[0]
    assert report["rate"] == pytest.approx(expected) and report["n"] == 3
    assert report["low"] <= report["rate"] <= report["high"]
    assert (report["missing"], report["failed_rows"]) == (1, 1)
