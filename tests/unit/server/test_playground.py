"""The trace viewer's HTTP side (docs/playground.md): served at /playground as plain static files,
off with SLHF_PLAYGROUND=false, behind the API keys like /v1 (Bearer, or the key as a browser's
Basic password). Its behaviour in a real browser: tests/integration/server/test_playground.py."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from slhf_server.app import create_app
from slhf_server.playground import STATIC_DIR
from slhf_server.settings import ServerSettings
from tests.fakes import ScriptedEngine, numbered_script
from tests.unit.server.test_routes import WEIGHTS

REPO = Path(__file__).resolve().parents[3]


def client_for(**settings: object) -> TestClient:
    engine = ScriptedEngine(numbered_script, context=512)
    app = create_app(
        ServerSettings(**settings),  # type: ignore[arg-type]
        weights=WEIGHTS,
        engine_factory=lambda w, s: engine,
    )
    return TestClient(app)


def test_playground_serves_the_page_and_its_files() -> None:
    with client_for() as c:
        r = c.get("/playground", follow_redirects=False)
        assert r.status_code in (302, 307) and r.headers["location"] == "/playground/"
        page = c.get("/playground/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "SLHF playground" in page.text
        for name in ("playground.js", "playground.css"):
            assert c.get(f"/playground/{name}").status_code == 200
        assert c.get("/playground/nope.js").status_code == 404


def test_playground_is_off_with_the_setting() -> None:
    with client_for(playground=False) as c:
        r = c.get("/playground/")
        assert r.status_code == 404 and isinstance(r.json()["error"]["code"], str)


@pytest.mark.parametrize("path", ["/playground", "/playground/", "/playground/playground.js"])
def test_playground_is_behind_the_api_key(path: str) -> None:
    basic = base64.b64encode(b"anyone:k2").decode()
    with client_for(api_keys="k1,k2") as c:
        refused = c.get(path, follow_redirects=False)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        wrong = base64.b64encode(b"anyone:nope").decode()
        headers = {"Authorization": f"Basic {wrong}"}
        assert c.get(path, headers=headers, follow_redirects=False).status_code == 401
        for auth in ("Bearer k1", f"Basic {basic}"):
            r = c.get(path, headers={"Authorization": auth}, follow_redirects=False)
            assert r.status_code in (200, 307), (auth, r.status_code)


def test_basic_auth_opens_only_the_playground() -> None:
    basic = base64.b64encode(b"x:k1").decode()
    with client_for(api_keys="k1") as c:
        r = c.get("/v1/models", headers={"Authorization": f"Basic {basic}"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_playground_is_plain_static_files_with_nothing_from_elsewhere() -> None:
    names = sorted(p.name for p in STATIC_DIR.iterdir())
    assert names == ["index.html", "playground.css", "playground.js"]
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), path.name
        assert not re.search(r"^\s*import\s", text, re.M), path.name
