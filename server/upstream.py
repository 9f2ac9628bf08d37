"""The upstream server: another OpenAI-compatible server that gives the first answer.

In upstream mode the service asks ``SLHF_UPSTREAM_MODEL`` at ``SLHF_UPSTREAM_BASE_URL`` for the
first answer (``leader.source`` = "upstream") and refines it with its own Follower. Failures
become a 502 carrying the upstream status and message; a timeout becomes a 504 -- never a hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from models.templates import Message, to_messages
from server.errors import SLHFError
from server.generation import FinishReason, Generation, GenerationParams
from server.settings import ServerSettings


class UpstreamError(SLHFError):
    """The upstream server failed or answered something unusable."""

    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeoutError(SLHFError):
    status_code = 504
    error_type = "upstream_timeout"


def _upstream_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body["error"]["message"]) if "error" in body else resp.text[:500]
    except (ValueError, KeyError, TypeError):
        return resp.text[:500]


class UpstreamClient:
    """Asks the upstream server's ``/chat/completions`` for one answer."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport
        )

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> UpstreamClient | None:
        if settings.upstream_base_url is None or settings.upstream_model is None:
            return None
        return cls(
            settings.upstream_base_url,
            settings.upstream_model,
            api_key=settings.upstream_api_key,
            timeout_s=settings.upstream_timeout_s,
        )

    async def answer(self, prompt: str | Sequence[Message], params: GenerationParams) -> Generation:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_messages(prompt),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        where = f"upstream {self.base_url} (model {self.model})"
        try:
            resp = await self._client.post("/chat/completions", json=body)
        except httpx.TimeoutException as e:
            raise UpstreamTimeoutError(
                f"{where} did not answer within {self.timeout_s:g} s (SLHF_UPSTREAM_TIMEOUT_S)",
                code="upstream_timeout",
            ) from e
        except httpx.HTTPError as e:
            raise UpstreamError(
                f"{where} could not be reached: {type(e).__name__}: {e}", code="upstream_error"
            ) from e
        if resp.status_code != 200:
            raise UpstreamError(
                f"{where} answered {resp.status_code}: {_upstream_message(resp)}",
                code="upstream_error",
            )
        return self._generation(resp, where)

    @staticmethod
    def _generation(resp: httpx.Response, where: str) -> Generation:
        try:
            body = resp.json()
            choice = body["choices"][0]
            text = choice["message"]["content"] or ""
            usage = body.get("usage") or {}
            finish: FinishReason = "length" if choice.get("finish_reason") == "length" else "stop"
            return Generation(
                text=text,
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                finish_reason=finish,
            )
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise UpstreamError(
                f"{where} answered 200 but not a chat completion: {resp.text[:300]}",
                code="upstream_error",
            ) from e

    async def aclose(self) -> None:
        await self._client.aclose()
