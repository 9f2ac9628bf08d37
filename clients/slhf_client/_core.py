"""What the sync and async clients share: configuration, retries, request bodies, SSE parsing."""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from .errors import APIStatusError, status_error

DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_TIMEOUT_S = 600.0
"""Refinement runs several generations per request: the read timeout is generous."""
RETRY_STATUSES = frozenset({408, 409, 429})
"""Retried, with every 5xx. Nothing else is (a 400 will fail the same way again)."""

Messages = Sequence[Mapping[str, str]]
"""A chat conversation: ``[{"role": "user", "content": "..."}, ...]``."""


def resolve_base_url(base_url: str | None) -> str:
    """``base_url``, else ``SLHF_BASE_URL``, else localhost:8000; a trailing ``/v1`` is dropped
    so the same value works for this client and the OpenAI SDK."""
    url = (base_url or os.environ.get("SLHF_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("SLHF_API_KEY") or None


def headers(api_key: str | None) -> dict[str, str]:
    h = {"Accept": "application/json", "User-Agent": "slhf-client/0.1"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def timeout(seconds: float | httpx.Timeout) -> httpx.Timeout:
    if isinstance(seconds, httpx.Timeout):
        return seconds
    return httpx.Timeout(seconds, connect=min(10.0, seconds))


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on 408/409/429/5xx, timeouts and connection errors, with capped exponential
    backoff. A ``Retry-After`` header (seconds or an HTTP date) wins over the backoff when it is
    at most ``max_retry_after_s``; longer waits are not worth holding a caller for."""

    max_retries: int = 2
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0
    jitter: float = 0.25
    """Backoff is multiplied by a random factor in ``[1 - jitter, 1]``."""

    def should_retry(self, status_code: int) -> bool:
        return status_code in RETRY_STATUSES or status_code >= 500

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0 = the first retry)."""
        after = retry_after(response) if response is not None else None
        if after is not None and after <= self.max_retry_after_s:
            return after
        backoff = min(self.initial_backoff_s * 2.0**attempt, self.max_backoff_s)
        return backoff * (1 - self.jitter * random.random())


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (``retry-after-ms`` first), if usable."""
    ms: str | None = response.headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value: str | None = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _decoded(response: httpx.Response) -> object:
    """The JSON body of a response that has been read; ``None`` when it is not JSON."""
    try:
        body: object = response.json()
    except ValueError:
        return None
    return body


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The error for a non-2xx response whose body has been read."""
    body = _decoded(response)
    return status_error(response.status_code, body, response.text if body is None else "")


def response_object(response: httpx.Response) -> dict[str, Any]:
    """The body of a successful response: a JSON object, as every route of the wire contract
    answers. Anything else is raised as an ``APIStatusError`` carrying the response's status."""
    body = _decoded(response)
    if not isinstance(body, dict):
        raise APIStatusError(
            f"expected a JSON object, got {response.text[:200]!r}",
            status_code=response.status_code,
            body=body,
        )
    return body


def as_messages(prompt: str | Messages) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def refine_body(
    prompt: str | Messages,
    *,
    rounds: int | None,
    response: str | None,
    model: str | None,
    leader: dict[str, Any] | None,
    follower: dict[str, Any] | None,
    seed: int | None,
    stop_when_unchanged: bool | None,
    response_format: dict[str, Any] | None = None,
    logprobs: bool | None = None,
    top_logprobs: int | None = None,
) -> dict[str, Any]:
    """The ``/v1/refine`` body. ``response_format`` is the answer's: it goes to the Follower,
    and to the Leader too unless ``rounds`` >= 1 is given (then the Leader answers freely and
    the Follower's rounds, which end the chain, are constrained; as on the OpenAI routes), so
    the answer satisfies it whichever round ends the chain. ``logprobs`` / ``top_logprobs`` go
    to both roles: every round reports its own tokens. A role's own values win."""
    body: dict[str, Any] = (
        {"prompt": prompt} if isinstance(prompt, str) else {"messages": as_messages(prompt)}
    )
    every = drop_none({"logprobs": logprobs, "top_logprobs": top_logprobs})
    answer = drop_none({"response_format": response_format})
    leader_free = rounds is not None and rounds >= 1
    body.update(
        drop_none(
            {
                "model": model,
                "rounds": rounds,
                "response": response,
                "leader": _over(every if leader_free else {**every, **answer}, leader),
                "follower": _over({**every, **answer}, follower),
                "seed": seed,
                "stop_when_unchanged": stop_when_unchanged,
            }
        )
    )
    return body


def _over(fields: dict[str, Any], own: dict[str, Any] | None) -> dict[str, Any] | None:
    """A role's own sampling over ``fields``; None when both are empty."""
    return {**fields, **(own or {})} or None


def chat_body(
    messages: str | Messages,
    *,
    model: str | None,
    rounds: int | None,
    response: str | None,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    n: int | None,
    return_trace: bool,
    stream: bool,
    stream_rounds: bool,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    refinement = drop_none({"rounds": rounds, "response": response})
    if return_trace:
        refinement["return_trace"] = True
    if stream_rounds:
        refinement["stream_rounds"] = True
    body: dict[str, Any] = {"messages": as_messages(messages)}
    body.update(
        drop_none(
            {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": seed,
                "n": n,
            }
        )
    )
    if refinement:
        body["refinement"] = refinement
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    return body


def sse_data(line: str) -> dict[str, Any] | None:
    """The JSON object of one SSE line; ``None`` for comments, blank lines and ``[DONE]``.
    An ``{"error": ...}`` event (a failure after the stream started) is raised."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data or data == "[DONE]":
        return None
    body: object = json.loads(data)
    if isinstance(body, dict) and "error" in body:
        raise status_error(None, body)
    return body if isinstance(body, dict) else None
