"""The trace viewer in a real headless Chromium against a real server (docs/playground.md): the page
loads, lists the model, streams every round of a refinement into its own card, and shows each
round's tokens, latency and word diff against the round before -- the same rounds the API gives for
the same seeded request.

Set ``SLHF_PLAYGROUND_SCREENSHOT=path.png`` to keep the screenshot (docs/playground.png).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slhf_client.render import word_diff
from tests.integration.browser import Chromium, chromium_or_skip
from tests.integration.conftest import ServerProcess

ROUNDS = 2
SETTINGS = {"max_tokens": 12, "temperature": 0.8, "seed": 7}
PROMPT = "Explain why the sky is blue."


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    chrome = Chromium(chromium_or_skip())
    try:
        yield chrome
    finally:
        chrome.close()


def fill(browser: Chromium, element_id: str, value: object) -> None:
    browser.evaluate(f"document.getElementById({element_id!r}).value = {json.dumps(value)}")


def api_rounds(server: ServerProcess, model: str) -> list[str]:
    """The rounds the API gives for the request the page sends (not streamed)."""
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "top_p": 1,
            **SETTINGS,
            "refinement": {"rounds": ROUNDS, "return_trace": True, "stop_when_unchanged": False},
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    trace = r.json()["choices"][0]["refinement"]
    return [trace["leader"]["text"], *(x["text"] for x in trace["rounds"])]


def test_page_word_diff_agrees_with_slhf_refine(
    browser: Chromium, shared_server: ServerProcess
) -> None:
    browser.goto(shared_server.url + "/playground/")
    old, new = " the cat sat on the mat\n", "  the dog sat on a mat\n"
    parts = browser.evaluate(f"slhfPlayground.wordDiff({json.dumps(old)}, {json.dumps(new)})")
    kept = "".join(p["text"] for p in parts if p["op"] != "removed")
    dropped = "".join(p["text"] for p in parts if p["op"] != "added")
    assert kept == new and dropped.split() == old.split()  # equal words keep the new spacing
    added = sum(len(p["text"].split()) for p in parts if p["op"] == "added")
    removed = sum(len(p["text"].split()) for p in parts if p["op"] == "removed")
    py = word_diff(old, new)
    assert (added, removed) == (py.added, py.removed) == (2, 2)


def test_playground_streams_every_round_with_diffs_tokens_and_latency(
    browser: Chromium, shared_server: ServerProcess, tmp_path: Path
) -> None:
    browser.goto(shared_server.url + "/playground/")
    model = browser.wait_for("document.getElementById('model').value", timeout_s=30)
    fill(browser, "prompt", PROMPT)
    fill(browser, "rounds", ROUNDS)
    fill(browser, "max-tokens", SETTINGS["max_tokens"])
    fill(browser, "temperature", SETTINGS["temperature"])
    fill(browser, "seed", SETTINGS["seed"])
    browser.evaluate("document.getElementById('stop-unchanged').checked = false")
    browser.evaluate("document.getElementById('run').click()")
    state = browser.wait_for(
        "['done', 'error'].includes(document.getElementById('rounds-view').dataset.state)"
        " && document.getElementById('rounds-view').dataset.state",
        timeout_s=120,
    )
    status = browser.evaluate("document.getElementById('status').textContent")
    assert state == "done", status
    cards = browser.evaluate(
        """[...document.querySelectorAll('.round')].map((c) => ({
            round: Number(c.dataset.round),
            chunks: Number(c.dataset.chunks),
            title: c.querySelector('h2').firstChild.textContent,
            text: c.querySelector('.text').textContent,
            stats: c.querySelector('.stats').textContent,
            summary: (c.querySelector('.diff-summary') || {}).textContent || null,
            diffNew: c.querySelector('.diff') ? [...c.querySelector('.diff').childNodes]
                .filter((n) => n.nodeName !== 'DEL').map((n) => n.textContent).join('') : null,
        }))"""
    )
    assert [c["round"] for c in cards] == list(range(ROUNDS + 1))
    assert cards[0]["title"] == "Round 0 · Leader" and cards[1]["title"] == "Round 1 · Follower"
    assert all(c["chunks"] >= 1 for c in cards), cards  # every round streamed in
    assert all(c["text"] for c in cards)
    for c in cards:
        assert "completion tokens" in c["stats"] and " ms · " in c["stats"], c["stats"]
    assert cards[0]["summary"] is None
    for c in cards[1:]:
        assert c["summary"] and "previous round" in c["summary"]
        assert c["diffNew"] == c["text"]  # the diff, without the struck words, is the new text
    assert [c["text"] for c in cards] == api_rounds(shared_server, model)
    assert status.startswith("stopped: max_rounds")

    shot = tmp_path / "playground.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("SLHF_PLAYGROUND_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
