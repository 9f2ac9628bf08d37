"""The OpenAPI document as the server behaves: typed answers, its error envelope, no 422s.

FastAPI documents a ``422 HTTPValidationError`` on every route with a body or parameters; this
server never sends one (``slhf_server.errors`` answers invalid input with a 400 envelope), so
``install_openapi`` removes them and documents the envelope instead (``ERROR_RESPONSES``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from slhf_server.protocol import ErrorResponse

_ERROR = {"model": ErrorResponse}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Invalid request (the message names the field)"},
    401: {**_ERROR, "description": "Missing or wrong API key (when SLHF_API_KEYS is set)"},
    404: {**_ERROR, "description": "Unknown model"},
    429: {**_ERROR, "description": "At capacity; retry after the Retry-After header's seconds"},
    503: {**_ERROR, "description": "Model not loaded yet, engine dead, or shutting down"},
}
"""Error answers common to the ``/v1`` routes (each also answers 408, 413, 502 and 504 in the
cases docs/reliability.md lists)."""


def sse_response(model: type, what: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is ``model`` as JSON, or with ``stream: true`` Server-Sent Events."""
    return {
        200: {
            "model": model,
            "description": f"The {what}; with `stream: true`, Server-Sent Events of its chunks "
            "ending with `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for operations in schema.get("paths", {}).values():
            for op in operations.values():
                op.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
