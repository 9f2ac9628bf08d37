"""The upstream server: another OpenAI-compatible server that gives the first answer.

In upstream mode the service asks ``SLHF_UPSTREAM_MODEL`` at ``SLHF_UPSTREAM_BASE_URL`` for the
first answer (``leader.source`` = "upstream") and refines it with its own Follower.

The upstream is treated as hostile (docs/reliability.md):

- one deadline, ``SLHF_UPSTREAM_TIMEOUT_S``, for the whole answer -- connecting, the status, every
  byte of the body -- so a server that drips a byte a second is a 504 at the deadline;
- a byte cap, ``SLHF_UPSTREAM_MAX_BYTES``, on the body as it arrives (and on a declared
  ``Content-Length``): a bigger answer is a 502 before it is all read;
- strict parsing, in a worker thread: ``choices[0].message.content`` a string (or null),
  ``usage`` non-negative integers, every text encodable Unicode; anything else is a 502 naming
  what was wrong, with the upstream status and message when it failed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slhf_models.serving.templates import Message, to_messages
from slhf_server import tracing
from slhf_server.engine import FinishReason, Generation, GenerationParams
from slhf_server.errors import UpstreamError, UpstreamTimeoutError, printable
from slhf_server.protocol import Text
from slhf_server.settings import ServerSettings

ERROR_BODY_BYTES = 64 * 1024
"""How much of a failed upstream answer is read for its error message."""
MAX_USAGE_TOKENS = 2**31 - 1


# -- what an upstream answer must look like (extra fields are ignored) ---------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Message(_Strict):
    content: Text | None = None


class _Choice(_Strict):
    message: _Message
    finish_reason: str | None = None


class _Usage(_Strict):
    prompt_tokens: int = Field(0, ge=0, le=MAX_USAGE_TOKENS)
    completion_tokens: int = Field(0, ge=0, le=MAX_USAGE_TOKENS)


class _ChatCompletion(_Strict):
    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage | None = None


def parse_answer(raw: bytes, where: str) -> Generation:
    """A chat completion's first answer from the upstream's body, strictly; else ``UpstreamError``
    naming what was wrong."""
    try:
        answer = _ChatCompletion.model_validate_json(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise UpstreamError(
            f"{where} answered 200 but not a chat completion: {problems}",
            code="upstream_invalid_answer",
        ) from None
    choice, usage = answer.choices[0], answer.usage or _Usage()
    finish: FinishReason = "length" if choice.finish_reason == "length" else "stop"
    return Generation(
        text=choice.message.content or "",
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        finish_reason=finish,
    )


def _error_message(raw: bytes) -> str:
    """The message of an upstream error envelope, else the start of its body."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
        return printable(str(body["error"]["message"]))[:500]
    except (ValueError, KeyError, TypeError):
        return printable(text[:500])


class UpstreamClient:
    """Asks the upstream server's ``/chat/completions`` for one answer."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_bytes: int = 2 * 1024 * 1024,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        headers = {"Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
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
            max_bytes=settings.upstream_max_bytes,
        )

    @property
    def where(self) -> str:
        return f"upstream {self.base_url} (model {self.model})"

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
        with tracing.upstream_span(self.base_url, self.model) as span:
            status, raw = await self._answer(body)
            if span is not None:
                span.set_attribute("http.response.status_code", status)
        if status != 200:
            message = await asyncio.to_thread(_error_message, raw)
            raise UpstreamError(f"{self.where} answered {status}: {message}", code="upstream_error")
        return await asyncio.to_thread(parse_answer, raw, self.where)

    async def _answer(self, body: dict[str, Any]) -> tuple[int, bytes]:
        """The status and body of the upstream's answer within the deadline."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._post(body, tracing.trace_headers())
        except (TimeoutError, httpx.TimeoutException) as e:
            raise UpstreamTimeoutError(
                f"{self.where} did not answer within {self.timeout_s:g} s "
                "(SLHF_UPSTREAM_TIMEOUT_S, for the whole answer)",
                code="upstream_timeout",
            ) from e
        except httpx.HTTPError as e:
            raise UpstreamError(
                f"{self.where} could not be reached: {type(e).__name__}: {e}",
                code="upstream_error",
            ) from e

    async def _post(
        self, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """The status and the body, read up to the byte cap (``ERROR_BODY_BYTES`` of an error);
        ``headers``: the trace context, when traced."""
        async with self._client.stream(
            "POST", "/chat/completions", json=body, headers=headers
        ) as resp:
            cap = self.max_bytes if resp.status_code == 200 else ERROR_BODY_BYTES
            declared = resp.headers.get("content-length", "")
            if resp.status_code == 200 and declared.isdigit() and int(declared) > cap:
                raise self._too_large(f"{int(declared):,}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > cap:
                    if resp.status_code != 200:
                        break
                    raise self._too_large(f"more than {cap:,}")
            return resp.status_code, b"".join(chunks)[:cap]

    def _too_large(self, size: str) -> UpstreamError:
        return UpstreamError(
            f"{self.where} answered {size} bytes; the limit is {self.max_bytes:,} "
            "(SLHF_UPSTREAM_MAX_BYTES)",
            code="upstream_too_large",
        )

    async def aclose(self) -> None:
        await self._client.aclose()
