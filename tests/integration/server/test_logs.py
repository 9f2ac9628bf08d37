"""JSON logs (docs/deploy.md, "Logs") against a real ``slhf serve`` process: with
``SLHF_LOG_FORMAT=json`` every line of its output -- ours, uvicorn's, vLLM's, torch's C++ warnings,
progress bars, shutdown -- is one JSON object, with no ``color_message``; and vLLM's extra sampling
fields reach the engine (``ignore_eos`` + ``min_tokens`` make every generation run to
``max_tokens``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ServerProcess


def test_every_log_line_is_one_json_object_and_extra_fields_reach_vllm(
    tmp_path: Path, random_model: Path
) -> None:
    server = ServerProcess.start(
        tmp_path / "server.log",
        SLHF_MODEL=str(random_model),
        SLHF_LOG_FORMAT="json",
        SLHF_MAX_MODEL_LEN="512",
    )
    try:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Explain gravity"}],
                "max_tokens": 6,
                "min_tokens": 6,
                "ignore_eos": True,
                "min_p": 0.05,
                "repetition_penalty": 1.3,
                "presence_penalty": 0.5,
                "top_k": 20,
                "refinement": {"rounds": 1, "return_trace": True},
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        trace = r.json()["choices"][0]["refinement"]
        lengths = [trace["leader"]["usage"]["completion_tokens"]]
        lengths += [x["usage"]["completion_tokens"] for x in trace["rounds"]]
        assert lengths == [6, 6]
        assert httpx.get(server.url + "/v1/nope", timeout=10).status_code == 404
    finally:
        assert server.stop() == 0
    lines = server.log.read_text(errors="replace").splitlines()
    not_json = []
    objects = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            objects.append(obj)
        else:
            not_json.append(line)
    assert not not_json, f"{len(not_json)} of {len(lines)} lines are not JSON: {not_json[:5]}"
    loggers = {o["logger"].split(".")[0] for o in objects}
    assert {"slhf", "uvicorn", "vllm"} <= loggers, loggers
    assert not [o for o in objects if "color_message" in o or "\x1b[" in o["message"]]
    assert objects[-1]["message"].startswith("Finished server process")


pytestmark = pytest.mark.integration
