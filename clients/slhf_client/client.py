"""The synchronous client: ``Client(base_url=None, api_key=None).refine("question", rounds=2)``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from . import _core
from ._core import Messages, RetryPolicy
from .errors import APIConnectionError, APITimeoutError
from .types import ChatChunk, ChatCompletion, Model, Refinement, chunks_from_event, json_objects


class Client:
    """A client of one SLHF server.

    ``base_url`` defaults to ``SLHF_BASE_URL`` (else ``http://localhost:8000``; a trailing
    ``/v1`` is accepted), ``api_key`` to ``SLHF_API_KEY``. Pass ``http_client`` to reuse a
    configured ``httpx.Client`` (tests pass one whose transport is the app itself).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = _core.DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = _core.resolve_base_url(base_url)
        self.api_key = _core.resolve_api_key(api_key)
        self.retry = retry or RetryPolicy()
        if max_retries is not None:
            self.retry = dataclasses.replace(self.retry, max_retries=max_retries)
        self._timeout = _core.timeout(timeout)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self._timeout)
        self._sleep: Callable[[float], None] = time.sleep

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API ----------------------------------------------------------------------------------
    def refine(
        self,
        prompt: str | Messages,
        *,
        rounds: int | None = None,
        response: str | None = None,
        model: str | None = None,
        leader: dict[str, Any] | None = None,
        follower: dict[str, Any] | None = None,
        seed: int | None = None,
        stop_when_unchanged: bool | None = None,
        response_format: dict[str, Any] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
    ) -> Refinement:
        """``POST /v1/refine``: the Leader answer (or ``response``), every round, the final.

        ``prompt`` is a question string or a chat conversation ending with a user message.
        ``response_format`` (``{"type": "json_object"}``, or ``{"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}}}``) constrains the answer: the Follower's
        rounds, and the Leader's unless ``rounds`` >= 1 is given; each step reports it as
        ``output_format``. ``logprobs`` (with ``top_logprobs`` alternatives, 0..20) gives every
        step its tokens' log-probabilities (``Round.logprobs``, ``Refinement.final_logprobs``).
        ``leader`` / ``follower`` (per-role sampling, as on the wire) win over these.
        """
        body = _core.refine_body(
            prompt,
            rounds=rounds,
            response=response,
            model=model,
            leader=leader,
            follower=follower,
            seed=seed,
            stop_when_unchanged=stop_when_unchanged,
            response_format=response_format,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        return Refinement.from_dict(self._json("POST", "/v1/refine", body))

    def chat(
        self,
        messages: str | Messages,
        *,
        model: str | None = None,
        rounds: int | None = None,
        response: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        n: int | None = None,
        return_trace: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> ChatCompletion:
        """``POST /v1/chat/completions`` with the ``refinement`` extension."""
        body = _core.chat_body(
            messages,
            model=model,
            rounds=rounds,
            response=response,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            n=n,
            return_trace=return_trace,
            stream=False,
            stream_rounds=False,
            extra=extra,
        )
        return ChatCompletion.from_dict(self._json("POST", "/v1/chat/completions", body))

    def chat_stream(
        self,
        messages: str | Messages,
        *,
        model: str | None = None,
        rounds: int | None = None,
        response: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        n: int | None = None,
        return_trace: bool = False,
        stream_rounds: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Iterator[ChatChunk]:
        """Stream a chat completion: the final round's tokens (every round's with
        ``stream_rounds``). Closing the iterator early closes the connection, which aborts
        the generation on the server."""
        body = _core.chat_body(
            messages,
            model=model,
            rounds=rounds,
            response=response,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            n=n,
            return_trace=return_trace,
            stream=True,
            stream_rounds=stream_rounds,
            extra=extra,
        )
        return self._stream("/v1/chat/completions", body)

    def models(self) -> list[Model]:
        body = self._json("GET", "/v1/models")
        return [Model.from_dict(m) for m in json_objects(body.get("data"))]

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def ready(self) -> dict[str, Any]:
        return self._json("GET", "/ready")

    # -- transport ----------------------------------------------------------------------------
    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return _core.response_object(self._send(method, path, body, stream=False))

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[ChatChunk]:
        r = self._send("POST", path, body, stream=True)
        try:
            for line in r.iter_lines():
                event = _core.sse_data(line)
                if event is not None:
                    yield from chunks_from_event(event)
        except httpx.TimeoutException as e:
            raise APITimeoutError(f"stream timed out: {e}") from e
        except httpx.TransportError as e:
            raise APIConnectionError(f"stream broke: {e}") from e
        finally:
            r.close()

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool
    ) -> httpx.Response:
        """One request with retries; a non-2xx answer that is not retried is raised."""
        request = self._http.build_request(
            method,
            self.base_url + path,
            json=body,
            headers=_core.headers(self.api_key),
            timeout=self._timeout,
        )
        attempt = 0
        while True:
            try:
                r = self._http.send(request, stream=stream)
            except httpx.TimeoutException as e:
                if attempt >= self.retry.max_retries:
                    raise APITimeoutError(f"{method} {path} timed out: {e}") from e
                self._sleep(self.retry.delay(attempt))
            except httpx.TransportError as e:
                if attempt >= self.retry.max_retries:
                    raise APIConnectionError(f"cannot reach {self.base_url}: {e}") from e
                self._sleep(self.retry.delay(attempt))
            else:
                if r.is_success:
                    return r
                r.read()
                r.close()
                if attempt >= self.retry.max_retries or not self.retry.should_retry(r.status_code):
                    raise _core.error_from_response(r)
                self._sleep(self.retry.delay(attempt, r))
            attempt += 1
