"""``slhf refine`` against the real app in-process, and its word diffs."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from slhf.cli import main as slhf_main
from slhf_client import Client
from slhf_client.cli import add_refine_arguments, run_refine
from slhf_client.render import word_diff
from tests.fakes import Call, ScriptedEngine
from tests.unit.clients.test_client import make_app

ROUND_TEXTS = ["the sky is blue", "the sky is very blue", "the sky is very blue today"]


def growing(call: Call) -> str:
    """Round i says ``ROUND_TEXTS[i]`` (the last one repeats, so refinement can stop)."""
    index = int(call.request_id.rsplit("-", 1)[1])
    return ROUND_TEXTS[min(index, len(ROUND_TEXTS) - 1)]


@pytest.fixture
def client() -> Iterator[Client]:
    engine = ScriptedEngine(growing, context=512)
    with TestClient(make_app(engine)) as http:
        yield Client("http://testserver", http_client=http, max_retries=0)


def refine(client: Client, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_refine_arguments(parser)
    out = io.StringIO()
    rc = run_refine(parser.parse_args(list(argv)), client=client, out=out)
    return rc, out.getvalue()


def test_word_diff_marks_added_and_removed_words() -> None:
    d = word_diff("a b c d", "a x c d e")
    assert (d.added, d.removed) == (2, 1)
    assert d.text == "a [-b-] {+x+} c d {+e+} "
    assert d.hunks == ["[-b-] {+x+}", "{+e+}"]
    assert word_diff("same text", "same  text").unchanged


def test_word_diff_in_colour_uses_ansi() -> None:
    d = word_diff("a b", "a c", color=True)
    assert "\x1b[32mc\x1b[0m" in d.text and "\x1b[31;9mb\x1b[0m" in d.text


def test_refine_shows_leader_each_round_and_the_changes(client: Client) -> None:
    rc, out = refine(client, "Why is the sky blue?", "--rounds", "3")
    assert rc == 0
    assert "== Leader · 4 tokens ==\nthe sky is blue\n" in out
    assert "== Round 1 · +1 -0 words ·" in out and "the sky is {+very+} blue" in out
    assert "== Round 2 · +1 -0 words ·" in out and "very blue {+today+}" in out
    assert "== Round 3 · unchanged ·" in out
    assert "stopped: unchanged after 3 round(s)" in out
    assert "\x1b[" not in out  # not a TTY: no colours


def test_refine_a_given_response_from_a_file(client: Client, tmp_path: Path) -> None:
    answer = tmp_path / "answer.txt"
    answer.write_text("my own answer")
    rc, out = refine(client, "Q", "--rounds", "1", "--response-file", str(answer))
    assert rc == 0
    assert "== Answer (given) · 0 tokens ==\nmy own answer" in out
    assert "[-my own answer-]" in out


def test_refine_stream_prints_every_round_and_changes(client: Client) -> None:
    rc, out = refine(client, "Q", "--rounds", "2", "--stream")
    assert rc == 0, out
    assert "== Leader ==\nthe sky is blue\n" in out
    assert "== Round 1 ==\nthe sky is very blue\n+1 -0 words: {+very+}" in out
    assert "== Round 2 ==\nthe sky is very blue today\n+1 -0 words: {+today+}" in out
    assert "stopped: max_rounds after 2 round(s)" in out


def test_refine_reports_server_errors_with_exit_status_1(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _ = refine(client, "Q", "--rounds", "99")
    assert rc == 1
    assert "server error 400 (rounds)" in capsys.readouterr().err


def test_refine_json_prints_the_wire_body(client: Client) -> None:
    rc, out = refine(client, "Q", "--rounds", "1", "--json")
    assert rc == 0 and '"object": "refinement"' in out


def test_refine_with_a_json_schema_file_and_logprobs(client: Client, tmp_path: Path) -> None:
    schema = tmp_path / "reading.json"
    schema.write_text('{"type": "object"}')
    rc, out = refine(client, "Q", "--rounds", "1", "--json-schema", str(schema), "--logprobs")
    assert rc == 0, out
    # the fake gives every token -0.5; the Leader answers freely with rounds >= 1
    assert "== Leader · 4 tokens · mean logprob -0.500 ==" in out
    assert " ms · json_schema · mean logprob -0.500 ==" in out
    rc, out = refine(client, "Q", "--rounds", "0", "--json-object")
    assert rc == 0 and "== Leader · 4 tokens · json_object ==" in out


def test_refine_stream_shows_formats_and_logprobs_from_the_trace(client: Client) -> None:
    rc, out = refine(client, "Q", "--rounds", "1", "--stream", "--json-object", "--logprobs")
    assert rc == 0, out
    assert "round 0 · mean logprob -0.500\nround 1 · json_object · mean logprob -0.500\n" in out


def test_refine_bad_schema_file_or_two_formats_are_usage_errors(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert refine(client, "Q", "--json-schema", str(bad))[0] == 2
    assert refine(client, "Q", "--json-schema", str(tmp_path / "missing.json"))[0] == 2
    assert "cannot read input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        refine(client, "Q", "--json-schema", str(bad), "--json-object")
    assert e.value.code == 2


def test_slhf_has_a_refine_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        slhf_main(["refine", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--rounds" in out and "--response-file" in out and "--stream" in out


def test_refine_unreachable_server_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    rc = slhf_main(["refine", "Q", "--url", "http://127.0.0.1:9", "--timeout", "2"])
    assert rc == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
