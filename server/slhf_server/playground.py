"""The refinement trace viewer at ``/playground`` (docs/playground.md): plain static files.

The page calls this server's ``/v1/models`` and ``/v1/chat/completions`` (streamed, every
round, with the trace); nothing is built or fetched from elsewhere. ``SLHF_PLAYGROUND=false``
turns it off; with API keys it is behind them like ``/v1`` (``slhf_server.middleware``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_PATH = "/playground"
STATIC_DIR = Path(__file__).parent / "static" / "playground"


def mount_playground(app: FastAPI) -> None:
    @app.get(PLAYGROUND_PATH, include_in_schema=False)
    async def playground() -> RedirectResponse:
        return RedirectResponse(PLAYGROUND_PATH + "/")

    app.mount(
        PLAYGROUND_PATH + "/",
        StaticFiles(directory=STATIC_DIR, html=True),
        name="playground",
    )
