"""``slhf batch`` end to end on the shipped demo model (a real vLLM CPU engine in-process):
killed with SIGKILL mid-run, then resumed to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai.types.chat import ChatCompletion
from openai.types.completion import Completion

from tests.integration.conftest import REPO, server_env

ROWS = 48


def _rows() -> list[str]:
    rows = []
    for i in range(ROWS):
        body = {
            "messages": [{"role": "user", "content": f"Tell me about the number {i}"}],
            "max_tokens": 16,
            "seed": i,
            "refinement": {"rounds": 2, "return_trace": i % 2 == 0},
        }
        url = "/v1/chat/completions"
        if i == 5:
            url, body = "/v1/completions", {"prompt": "Explain rain", "max_tokens": 8, "seed": 1}
        rows.append(
            json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": url, "body": body})
        )
    rows.append(
        json.dumps(
            {
                "custom_id": "typo",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [], "round": 2},
            }
        )
    )
    return rows


def _batch(inp: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "slhf.cli", "batch", str(inp), "-o", str(out)]
    cmd += ["--concurrency", "2"]
    with log.open("ab") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=server_env(), stdout=f, stderr=f, start_new_session=True
        )


def _lines(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


def test_batch_killed_mid_run_resumes_to_every_row_exactly_once(tmp_path: Path) -> None:
    inp, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "batch.log"
    inp.write_text("\n".join(_rows()) + "\n")
    proc = _batch(inp, out, log)
    try:
        deadline = time.monotonic() + 240
        while len(_lines(out)) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, (
            "the batch ended before it could be killed:\n" + log.read_text()[-3000:]
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    data = out.read_bytes()
    assert data.endswith(b"\n"), "a torn line after kill -9"
    killed_at = [json.loads(x) for x in data.decode().splitlines()]  # every line whole JSON
    assert 6 <= len(killed_at) < ROWS + 1

    proc = _batch(inp, out, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert f"{len(killed_at)} already done" in log.read_text()
    records = [json.loads(x) for x in _lines(out)]
    assert records[: len(killed_at)] == killed_at  # nothing written was lost or rewritten
    ids = [r["custom_id"] for r in records]
    assert sorted(ids) == sorted([f"row-{i}" for i in range(ROWS)] + ["typo"])
    by_id = {r["custom_id"]: r for r in records}
    typo = by_id.pop("typo")["response"]
    assert typo["status_code"] == 400 and typo["body"]["error"]["param"] == "round"
    for cid, r in by_id.items():
        assert r["error"] is None and r["response"]["status_code"] == 200, r
        body = r["response"]["body"]
        assert r["response"]["request_id"] == body["id"]
        if cid == "row-5":
            assert Completion.model_validate(body).choices[0].text
            continue
        completion = ChatCompletion.model_validate(body)
        assert completion.object == "chat.completion"
        assert isinstance(completion.choices[0].message.content, str)
        trace = body["choices"][0]["refinement"]
        assert (trace is not None) == (int(cid.split("-")[1]) % 2 == 0)
        if trace is not None:
            assert 1 <= len(trace["rounds"]) <= 2
            assert (
                body["choices"][0]["message"]["content"]
                == (trace["rounds"] or [trace["leader"]])[-1]["text"]
            )

    again = _batch(inp, out, log)  # everything is done: nothing starts, nothing is written
    assert again.wait(timeout=60) == 0
    assert len(_lines(out)) == ROWS + 1
