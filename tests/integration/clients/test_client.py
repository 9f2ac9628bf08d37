"""The client, the ``slhf refine`` CLI and the examples against a real server process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slhf_client import AsyncClient, BadRequestError, Client, NotFoundError
from tests.integration.conftest import REPO, ServerProcess

EXAMPLES = REPO / "clients" / "examples"


def run(cmd: list[str], server: ServerProcess, timeout: float = 120) -> str:
    env = {**os.environ, "SLHF_BASE_URL": server.url, "NO_COLOR": "1"}
    env.pop("SLHF_API_KEY", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_client_refines_chats_and_streams(shared_server: ServerProcess) -> None:
    with Client(shared_server.url) as c:
        model = c.models()[0].id
        r = c.refine("Explain gravity", rounds=2, seed=1, leader={"max_tokens": 16})
        assert r.model == model and r.leader.source == "leader"
        assert 1 <= len(r.rounds) <= 2 and r.final == r.texts[-1]
        chat = c.chat("Explain gravity", rounds=2, seed=1, max_tokens=16, return_trace=True)
        assert chat.choices[0].refinement is not None and chat.usage.total_tokens > 0
        chunks = list(c.chat_stream("Explain gravity", rounds=1, max_tokens=8, stream_rounds=True))
        rounds = {ch.round for ch in chunks if ch.text}
        assert rounds <= {0, 1} and 0 in rounds
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_client_refine_with_a_schema_and_logprobs(shared_server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "Ok", "schema": schema}}
    with Client(shared_server.url) as c:
        r = c.refine(
            "Explain gravity",
            rounds=1,
            seed=1,
            stop_when_unchanged=False,
            response_format=fmt,
            logprobs=True,
            top_logprobs=2,
            follower={"max_tokens": 60},
            leader={"max_tokens": 12},
        )
    final = r.rounds[-1]
    assert r.leader.output_format is None and final.output_format == "json_schema"
    assert r.leader.logprobs and r.final_logprobs is final.logprobs and final.logprobs
    assert all(t.logprob <= 0 and len(t.top_logprobs) <= 2 for t in final.logprobs)
    if final.finish_reason == "stop":  # a constrained generation cut by max_tokens is a prefix
        assert isinstance(json.loads(r.final)["ok"], bool)


def test_client_errors_from_the_real_server(shared_server: ServerProcess) -> None:
    with Client(shared_server.url) as c:
        with pytest.raises(NotFoundError):
            c.refine("Q", model="no-such-model")
        with pytest.raises(BadRequestError, match="rounds"):
            c.refine("Q", rounds=1000)


def test_async_client_runs_requests_concurrently(shared_server: ServerProcess) -> None:
    async def scenario() -> list[str]:
        async with AsyncClient(shared_server.url + "/v1") as c:
            results = await asyncio.gather(
                *(c.refine(f"Question {i}", rounds=1, leader={"max_tokens": 8}) for i in range(4))
            )
        return [r.final for r in results]

    assert len(asyncio.run(scenario())) == 4


def test_slhf_refine_cli_shows_every_round(shared_server: ServerProcess) -> None:
    cmd = [sys.executable, "-m", "slhf.cli", "refine", "Explain gravity", "--rounds", "2"]
    out = run([*cmd, "--max-tokens", "12", "--seed", "0"], shared_server)
    assert "== Leader ·" in out and "== Round 1 ·" in out and "stopped:" in out
    out = run([*cmd, "--max-tokens", "12", "--stream"], shared_server)
    assert "== Leader ==" in out and "== Round 1 ==" in out and "stopped:" in out


@pytest.mark.parametrize("example", ["openai_sdk_chat.py", "openai_sdk_stream.py"])
def test_python_examples_run(shared_server: ServerProcess, example: str) -> None:
    out = run([sys.executable, str(EXAMPLES / example)], shared_server)
    assert "model:" in out or "round" in out


def test_curl_example_runs(shared_server: ServerProcess) -> None:
    script = EXAMPLES / "curl.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = run(["bash", str(script)], shared_server)
    assert '"object":"refinement"' in out.replace(" ", "") and "data: [DONE]" in out


def test_examples_folder_is_what_the_readme_names() -> None:
    names = {p.name for p in Path(EXAMPLES).iterdir()}
    assert {"openai_sdk_chat.py", "openai_sdk_stream.py", "curl.sh", "litellm_config.yaml"} <= names
