"""``slhf batch`` with a fake engine: the input scan, the output's resume and torn-line repair,
bad lines, and answers equal to the HTTP routes' for the same bodies."""

from __future__ import annotations

import asyncio
import io
import json
import typing
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from slhf.batch import (
    ENDPOINTS,
    InputError,
    OutputWriter,
    Progress,
    Row,
    answer,
    parse_line,
    recover_output,
    run_batch,
    scan_input,
)
from slhf_server.app import create_app
from slhf_server.service import Service
from slhf_server.settings import ServerSettings
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_routes import WEIGHTS

USER = [{"role": "user", "content": "Explain gravity"}]
SETTINGS = ServerSettings(max_rounds=4)


def line(custom_id: object, url: str = "/v1/chat/completions", **body: Any) -> str:
    body = body or {"messages": USER}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(x + "\n" for x in lines))
    return path


def service(engine: ScriptedEngine | None = None) -> Service:
    return Service.build(SETTINGS, WEIGHTS, engine or ScriptedEngine(numbered_script, context=512))


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# -- the input ----------------------------------------------------------------------------------
def test_scan_names_the_lines_of_missing_and_duplicate_custom_ids(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "in.jsonl",
        line("a"),
        line(None),
        line("b"),
        line("a"),
        "",
        json.dumps({"method": "POST"}),
        line(7),
    )
    with pytest.raises(InputError) as e:
        scan_input(path)
    assert "no string custom_id on line(s) 2, 6, 7" in str(e.value)
    assert "duplicate custom_id: 'a' (lines 1 and 4)" in str(e.value)


def test_scan_keys_rows_by_custom_id_and_unparseable_lines_by_number(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", line("a"), "{oops", "", "[1, 2]", line("b"))
    assert scan_input(path) == ["a", "line 2", "line 4", "b"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{oops", "invalid_json"),
        ("[1]", "invalid_line"),
        (
            json.dumps({"custom_id": "x", "method": "GET", "url": "/v1/refine", "body": {}}),
            "invalid_method",
        ),
        (line("x", url="/v1/embeddings"), "invalid_url"),
        (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/refine"}), "missing_body"),
    ],
)
def test_a_line_that_is_no_request_is_an_error_line(raw: str, code: str) -> None:
    out = parse_line(3, raw.encode(), 1 << 20)
    assert isinstance(out, dict)
    assert out["response"] is None and out["error"]["code"] == code and out["error"]["line"] == 3
    assert out["custom_id"] == (None if code in ("invalid_json", "invalid_line") else "x")


def test_a_body_over_the_body_limit_is_a_413_line() -> None:
    out = parse_line(
        1, line("big", messages=[{"role": "user", "content": "x" * 5000}]).encode(), 1024
    )
    assert isinstance(out, dict) and out["response"]["status_code"] == 413
    assert out["response"]["body"]["error"]["code"] == "payload_too_large"


# -- the output ---------------------------------------------------------------------------------
def test_a_torn_last_line_is_cut_and_written_rows_are_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = [{"custom_id": "a", "response": {}}, {"custom_id": None, "error": {"line": 4}}]
    whole = "".join(json.dumps(r) + "\n" for r in good)
    out.write_text(whole + '{"custom_id": "b", "resp')
    assert recover_output(out) == {"a", "line 4"}
    assert out.read_text() == whole
    out.write_text(whole + '{"custom_id": "b"\n')  # cut, then a newline (not one of ours)
    assert recover_output(out) == {"a", "line 4"}
    assert out.read_text() == whole
    assert recover_output(tmp_path / "none.jsonl") == set()


def test_a_bad_line_before_the_last_is_refused(tmp_path: Path) -> None:
    out = write_lines(tmp_path / "out.jsonl", "not json", json.dumps({"custom_id": "a"}))
    with pytest.raises(InputError, match="line 1 is not a batch output line"):
        recover_output(out)


def test_the_writer_appends_whole_lines(tmp_path: Path) -> None:
    out = write_lines(tmp_path / "out.jsonl", json.dumps({"custom_id": "a"}))
    writer = OutputWriter(out, fsync_every_s=0.0)
    writer.write({"custom_id": "b", "text": "\ud800 é"})  # escaped: always encodable
    writer.close()
    assert [r["custom_id"] for r in read_output(out)] == ["a", "b"]


def test_progress_without_a_terminal_prints_rows_and_tokens_per_second() -> None:
    stream = io.StringIO()
    progress = Progress(3, stream, every_s=0.0)
    progress.update(10)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "1/3 rows" in lines[-1] and "rows/s" in lines[-1]
    assert "tokens/s" in lines[-1]


# -- answers equal the routes' ------------------------------------------------------------------
def test_endpoints_are_the_apps_routes_with_their_body_models() -> None:
    app = create_app(SETTINGS, weights=WEIGHTS, engine_factory=lambda w, s: None)  # type: ignore[arg-type,return-value]
    routes = {r.path: r for r in app.routes if isinstance(r, APIRoute) and "POST" in r.methods}
    for url, endpoint in ENDPOINTS.items():
        assert routes[url].endpoint is endpoint.handler
        assert typing.get_type_hints(endpoint.handler)["body"] is endpoint.model


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """A response body without what differs between two answers: ids, times, latencies."""
    skip = {"id", "created", "latency_ms"}

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in skip}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(body)


BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": USER, "refinement": {"rounds": 2, "return_trace": True}}),
    ("/v1/chat/completions", {"model": "fake-slhf:leader", "messages": USER, "n": 2, "seed": 3}),
    ("/v1/completions", {"prompt": ["Explain gravity", "Why rain?"], "max_tokens": 5}),
    ("/v1/refine", {"prompt": "Explain gravity", "rounds": 3}),
    ("/v1/chat/completions", {"messages": USER, "round": 2}),  # unknown field
    ("/v1/chat/completions", {"messages": USER, "max_tokens": "10"}),  # strict types
    ("/v1/chat/completions", {"messages": USER, "model": "other"}),  # 404
    ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 2}),
    ("/v1/responses", {"input": "Explain gravity", "refinement": {"rounds": 2}}),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_1"}),  # refused field
    ("/v1/completions", {"prompt": "x", "temperature": 9}),
    ("/v1/refine", {"prompt": "x", "rounds": 99}),
    ("/v1/refine", ["not", "an", "object"]),  # type: ignore[list-item]
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
]


@pytest.mark.parametrize(("url", "body"), BODIES)
def test_a_body_is_answered_as_its_http_route_answers_it(url: str, body: Any) -> None:
    app = create_app(
        SETTINGS,
        weights=WEIGHTS,
        engine_factory=lambda w, s: ScriptedEngine(numbered_script, context=512),
    )
    with TestClient(app) as client:
        http = client.post(
            url, content=json.dumps(body), headers={"content-type": "application/json"}
        )
    status, got = asyncio.run(answer(service(), ENDPOINTS[url], body))
    assert status == http.status_code
    assert _comparable(got) == _comparable(http.json())


def test_stream_is_a_400_naming_the_field() -> None:
    status, body = asyncio.run(
        answer(service(), ENDPOINTS["/v1/chat/completions"], {"messages": USER, "stream": True})
    )
    assert status == 400 and body["error"]["param"] == "stream"


# -- the run ------------------------------------------------------------------------------------
def test_a_run_writes_every_row_once_and_a_rerun_resumes(tmp_path: Path) -> None:
    rows = [line(f"r{i}", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(6)]
    path = write_lines(tmp_path / "in.jsonl", *rows, "{bad", line("u", url="/v1/nope"))
    out = tmp_path / "out.jsonl"
    # a previous run wrote r0 and started r1 (torn)
    out.write_text(json.dumps({"custom_id": "r0", "response": None, "error": None}) + '\n{"cus')
    engine = ScriptedEngine(numbered_script, context=512, delay=0.01)
    report = asyncio.run(
        run_batch(service(engine), path, out, concurrency=2, progress_stream=io.StringIO())
    )
    assert (report.rows, report.skipped, report.written, report.errors) == (8, 1, 7, 2)
    assert engine.peak_running <= 2
    lines = read_output(out)
    keys = [r["custom_id"] or f"line {r['error']['line']}" for r in lines]
    assert sorted(keys) == sorted(["r0", "r1", "r2", "r3", "r4", "r5", "line 7", "u"])
    answers = [r for r in lines if r["response"] and r["response"]["status_code"] == 200]
    assert len(answers) == 5
    for r in answers:
        assert r["response"]["body"]["object"] == "chat.completion"
        assert r["response"]["request_id"] == r["response"]["body"]["id"]
        assert r["error"] is None and r["id"].startswith("batch_req_")
    again = asyncio.run(run_batch(service(engine), path, out, progress_stream=io.StringIO()))
    assert (again.skipped, again.written) == (8, 0)
    assert len(read_output(out)) == 8


def test_a_server_side_failure_is_not_written_so_a_rerun_retries_it(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", line("a"), line("b"))
    out = tmp_path / "out.jsonl"
    dead = ScriptedEngine(numbered_script, context=512, dead=True)
    report = asyncio.run(run_batch(service(dead), path, out, progress_stream=io.StringIO()))
    assert sorted(report.retry) == ["a", "b"] and report.written == 0
    assert "re-run the same command to retry" in report.summary()
    report = asyncio.run(run_batch(service(), path, out, progress_stream=io.StringIO()))
    assert report.written == 2 and not report.retry


def test_a_duplicate_custom_id_stops_the_run_before_any_row(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", line("a"), line("a"))
    engine = ScriptedEngine(numbered_script, context=512)
    with pytest.raises(InputError, match="lines 1 and 2"):
        asyncio.run(run_batch(service(engine), path, tmp_path / "out.jsonl"))
    assert engine.calls == [] and not (tmp_path / "out.jsonl").exists()


def test_row_is_kept_whole() -> None:
    row = parse_line(1, line("a").encode(), 1 << 20)
    assert isinstance(row, Row) and row.custom_id == "a" and row.body == {"messages": USER}


# -- the command (no engine) --------------------------------------------------------------------
def test_the_command_refuses_a_bad_input_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slhf.cli import main

    path = write_lines(tmp_path / "in.jsonl", line("a"), line(None), line("a"))
    assert main(["batch", str(path), "-o", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "line(s) 2" in err and "lines 1 and 3" in err
    assert not (tmp_path / "out.jsonl").exists()
    ok = write_lines(tmp_path / "ok.jsonl", line("a"))
    assert main(["batch", str(ok), "-o", str(tmp_path / "o.jsonl"), "--concurrency", "0"]) == 2


def test_the_command_with_every_row_written_exits_0_without_an_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slhf.cli import main

    path = write_lines(tmp_path / "in.jsonl", line("a"), "{bad")
    out = write_lines(
        tmp_path / "out.jsonl",
        json.dumps({"custom_id": "a", "response": None, "error": None}),
        json.dumps({"custom_id": None, "response": None, "error": {"line": 2}}),
    )
    assert main(["batch", str(path), "-o", str(out), "--model", "/nonexistent"]) == 0
    assert "all 2 rows are already in" in capsys.readouterr().err


def test_tokens_are_read_from_either_usage_shape() -> None:
    from types import SimpleNamespace

    from slhf.batch import model_tokens

    chat = SimpleNamespace(usage=SimpleNamespace(completion_tokens=7))
    responses = SimpleNamespace(usage=SimpleNamespace(output_tokens=5))  # the Responses API's
    assert model_tokens(chat) == 7  # type: ignore[arg-type]
    assert model_tokens(responses) == 5  # type: ignore[arg-type]
    assert model_tokens(SimpleNamespace(error={})) == 0  # type: ignore[arg-type]


def test_an_answered_line_splices_the_routes_json_as_the_batch_output_format() -> None:
    from slhf.batch import Answer, answered_line

    body = b'{"id":"chatcmpl-1","usage":{"completion_tokens":3},"text":"caf\xc3\xa9 \\n"}'
    line = answered_line('row "7"', Answer(200, body, "chatcmpl-1", 3))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert list(record) == ["id", "custom_id", "response", "error"]
    assert record["custom_id"] == 'row "7"' and record["error"] is None
    assert record["response"] == {
        "status_code": 200,
        "request_id": "chatcmpl-1",
        "body": json.loads(body),
    }
    failed = json.loads(answered_line("x", Answer(400, b'{"error":{}}', None, 0)))
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["request_id"].startswith("batch_req_")
