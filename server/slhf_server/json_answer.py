"""A JSON answer built and serialized off the event loop (docs/reliability.md).

A non-streamed answer may hold ``SLHF_MAX_N`` choices of ``SLHF_MAX_TOKENS_CAP`` tokens of text
per round, with every round's trace: megabytes of JSON. ``json_answer`` builds the wire model and
writes its bytes in a worker thread, and the route returns the finished ``Response`` (FastAPI
then neither validates nor serializes it again; the route's ``response_model`` still documents
it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import Response
from pydantic import BaseModel


class JSONAnswer(Response):
    """A finished JSON answer that keeps the model it was written from (``slhf batch`` reads
    the answer's id and usage from it instead of parsing the bytes back)."""

    media_type = "application/json"

    def __init__(self, model: BaseModel) -> None:
        super().__init__(model.model_dump_json(by_alias=True))
        self.model = model


def _render(build: Callable[[], BaseModel]) -> JSONAnswer:
    return JSONAnswer(build())


async def json_answer(build: Callable[[], BaseModel]) -> JSONAnswer:
    """``build()``'s model as a JSON response, built and serialized in a worker thread (field
    names by alias, as FastAPI writes a returned model)."""
    return await asyncio.to_thread(_render, build)
