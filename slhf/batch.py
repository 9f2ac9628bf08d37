"""``slhf batch INPUT.jsonl -o OUTPUT.jsonl``: refine a whole file of requests offline.

The input is the OpenAI Batch file format (``vllm run-batch`` reads the same): one JSON object a
line, ``{"custom_id", "method": "POST", "url", "body"}``. Each output line is
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``; the body is
exactly what the HTTP route answers the same body with (an error envelope for a 4xx), because
each body is validated by the route's own request model and answered by the route's own function
(``ENDPOINTS``) on an in-process engine. A line that cannot become a request at all (not JSON,
not an object, another method, a url not in ``ENDPOINTS``) gets ``"response": null`` and
``"error": {"code", "message", "line"}``, as the Batch API reports such lines; the run goes on.

Before the engine starts, the input is scanned: a line without a string ``custom_id``, or a
``custom_id`` used twice, stops the run (exit 2, with the line numbers). The output is appended
to, one line per finished row, each written with one ``write`` (a ``kill -9`` cannot cut a line
the kernel already has; the file is fsynced every ``FSYNC_EVERY_S`` and at the end). On start, a
torn last line (a crash of the machine mid-write) is cut off, and every row already in the output
is skipped: re-running the same command resumes. A row the server side failed (5xx: the engine
failed, a deadline, the upstream) is not written, so the next run retries it; the run then exits
1. docs/batch.md is the user's page.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from slhf_server import routes, routes_openai, routes_responses
from slhf_server.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    SLHFError,
    domain_error,
    error_body,
)
from slhf_server.json_answer import JSONAnswer
from slhf_server.metrics import ServiceMetrics
from slhf_server.openai_protocol import ChatCompletionRequest, CompletionRequest
from slhf_server.protocol import RefineRequest
from slhf_server.refine import RefineOutcome
from slhf_server.responses_protocol import ResponsesRequest
from slhf_server.service import Service

Handler = Callable[..., Awaitable[Any]]
"""A route function, called as ``handler(body=..., request=..., service=...)``."""


@dataclass(frozen=True)
class Endpoint:
    """A url a batch line may name: its route's request model and its route's function."""

    model: type[BaseModel]
    handler: Handler


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(ChatCompletionRequest, routes_openai.chat_completions),
    "/v1/completions": Endpoint(CompletionRequest, routes_openai.completions),
    "/v1/refine": Endpoint(RefineRequest, routes.refine),
    "/v1/responses": Endpoint(ResponsesRequest, routes_responses.responses),
}
"""url -> (request model, route function): the routes a batch can run, one entry each."""

DEFAULT_CONCURRENCY = 256
"""Rows in flight at once: enough to keep a GPU engine's batch full (vLLM's default
``max_num_seqs`` is 256 or less), rows beyond wait in the input."""
FSYNC_EVERY_S = 1.0
"""Seconds between fsyncs of the output (and one at the end)."""
PROGRESS_EVERY_S = 10.0
"""Without a terminal: seconds between progress lines."""


class InputError(Exception):
    """The input cannot be run: a missing or duplicate ``custom_id`` (with line numbers)."""


# -- reading the input --------------------------------------------------------------------------
def line_key(custom_id: str | None, line: int) -> str:
    """What identifies a row in the output: its custom_id, or its line for an unparseable one."""
    return custom_id if custom_id is not None else f"line {line}"


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw bytes) of each non-blank line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def _custom_id(raw: bytes) -> tuple[bool, object]:
    """(is a JSON object, its custom_id) of a line; (False, None) when it is not one."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return False, None
    return (True, obj.get("custom_id")) if isinstance(obj, dict) else (False, None)


def scan_input(path: Path) -> list[str]:
    """The keys of the input's rows, in order; ``InputError`` naming the lines of every
    JSON-object line without a string ``custom_id`` and of every ``custom_id`` used twice.
    (A line that is not a JSON object is run as an error row, keyed by its line number.)"""
    keys: list[str] = []
    first: dict[str, int] = {}
    missing: list[int] = []
    duplicates: list[str] = []
    for number, raw in read_lines(path):
        is_object, cid = _custom_id(raw)
        if not is_object:
            keys.append(line_key(None, number))
            continue
        if not isinstance(cid, str) or not cid:
            missing.append(number)
            continue
        if cid in first:
            duplicates.append(f"{cid!r} (lines {first[cid]} and {number})")
            continue
        first[cid] = number
        keys.append(cid)
    problems = []
    if missing:
        problems.append(f"no string custom_id on line(s) {', '.join(map(str, missing))}")
    if duplicates:
        problems.append(f"duplicate custom_id: {'; '.join(duplicates)}")
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems))
    return keys


# -- resuming the output ------------------------------------------------------------------------
def output_key(record: object) -> str | None:
    """The row key of an output line (``line_key``), None when it names none."""
    if not isinstance(record, dict):
        return None
    cid = record.get("custom_id")
    if isinstance(cid, str):
        return cid
    error = record.get("error")
    if isinstance(error, dict) and isinstance(error.get("line"), int):
        return line_key(None, error["line"])
    return None


def recover_output(path: Path) -> set[str]:
    """The keys already written to ``path`` (none when it does not exist). A torn last line --
    no final newline, or not JSON -- is cut off first; a bad line before the last one is an
    ``InputError`` (the file is not one of ours)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to the last complete line
    lines = data[:end].splitlines()
    done: set[str] = set()
    for i, raw in enumerate(lines):
        try:
            key = output_key(json.loads(raw))
        except ValueError:
            key = None
        if key is None:
            if i == len(lines) - 1:  # a last line cut in a way that left a newline
                end -= len(raw) + 1
                break
            raise InputError(f"{path}: line {i + 1} is not a batch output line; not resuming")
        done.add(key)
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return done


class OutputWriter:
    """Appends output lines, each with one ``write``; fsyncs every ``fsync_every_s`` and on
    ``close``."""

    def __init__(self, path: Path, fsync_every_s: float = FSYNC_EVERY_S) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fsync_every_s = fsync_every_s
        self._synced = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        self.write_line((json.dumps(record, separators=(",", ":")) + "\n").encode())

    def write_line(self, data: bytes) -> None:
        """One whole output line (ending in a newline), with one ``write``."""
        view = memoryview(data)
        while view:  # a regular file takes it whole unless the disk is full
            view = view[os.write(self.fd, view) :]
        if time.monotonic() - self._synced >= self.fsync_every_s:
            os.fsync(self.fd)
            self._synced = time.monotonic()

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


# -- one row ------------------------------------------------------------------------------------
def _new_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def line_failed(custom_id: str | None, line: int, code: str, message: str) -> dict[str, Any]:
    """The output line of an input line that is no request (the Batch API's ``error``)."""
    return {
        "id": _new_id(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "line": line},
    }


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def answered_line(custom_id: str, got: Answer) -> bytes:
    """``answered(...)`` as the output line's bytes, with the route's JSON body spliced in as
    it is (not parsed and written again)."""
    request_id = got.request_id if got.status == 200 and got.request_id else _new_id()
    head = _dumps({"id": _new_id(), "custom_id": custom_id})[:-1]
    response = b'"status_code":%d,"request_id":%s' % (got.status, _dumps(request_id))
    return head + b',"response":{' + response + b',"body":' + got.body + b'},"error":null}\n'


def answered(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """The output line of a row the route answered (any status)."""
    request_id = body.get("id") if status == 200 else None
    return {
        "id": _new_id(),
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": request_id if isinstance(request_id, str) else _new_id(),
            "body": body,
        },
        "error": None,
    }


@dataclass(frozen=True)
class Row:
    """A line that names a served url: its custom_id, endpoint and raw body."""

    custom_id: str
    endpoint: Endpoint
    body: object


def parse_line(number: int, raw: bytes, max_body_bytes: int) -> Row | dict[str, Any]:
    """A row to run, or the output line of a line that cannot be run."""
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return line_failed(None, number, "invalid_json", f"line {number} is not JSON: {e}")
    if not isinstance(obj, dict):
        return line_failed(None, number, "invalid_line", f"line {number} is not a JSON object")
    cid = obj["custom_id"]  # scan_input checked it
    method = obj.get("method")
    if method != "POST":
        return line_failed(cid, number, "invalid_method", f"method must be POST; got {method!r}")
    url = obj.get("url")
    endpoint = ENDPOINTS.get(url) if isinstance(url, str) else None
    if endpoint is None:
        urls = ", ".join(ENDPOINTS)
        return line_failed(cid, number, "invalid_url", f"url {url!r} is not one of: {urls}")
    if "body" not in obj:
        return line_failed(cid, number, "missing_body", "the line has no body")
    if len(raw) > max_body_bytes:  # as the server's body limit (SLHF_MAX_BODY_BYTES)
        error = PayloadTooLargeError(
            f"request body exceeds the {max_body_bytes}-byte limit (SLHF_MAX_BODY_BYTES)"
        )
        return answered(cid, error.status_code, error_body(error))
    return Row(cid, endpoint, obj["body"])


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Future()  # an in-process caller never goes away; cancelled with the row
    raise AssertionError("unreachable")


def in_process_request() -> Request:
    """The ``Request`` a route gets in a batch: a caller that never disconnects."""
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    return Request(scope, receive=_never_disconnects)


@dataclass(frozen=True)
class Answer:
    """What a route answered a row with: its status and JSON body (the bytes the HTTP route
    would send), the answer's id and its generated tokens."""

    status: int
    body: bytes
    request_id: str | None
    tokens: int


async def answer_row(service: Service, endpoint: Endpoint, body: object) -> Answer:
    """The route's answer to ``body``, as over HTTP: the route's own model validates it, the
    route's own function answers it; every failure becomes its error envelope."""
    try:
        try:
            request = endpoint.model.model_validate(body, from_attributes=True)  # as FastAPI
        except ValidationError as e:  # as FastAPI reports a body's errors
            errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
            raise RequestValidationError(errors) from None
        if getattr(request, "stream", False):
            raise InvalidRequestError(
                "stream is not supported in a batch; leave it out", param="stream"
            )
        response = await endpoint.handler(
            body=request, request=in_process_request(), service=service
        )
        if isinstance(response, JSONAnswer):  # the finished JSON (slhf_server.json_answer)
            model, status, data = response.model, response.status_code, bytes(response.body)
        else:  # a wire model, as FastAPI would write it
            model, status = response, 200
            data = response.model_dump_json(by_alias=True).encode()
        request_id = getattr(model, "id", None)
        return Answer(
            status, data, request_id if isinstance(request_id, str) else None, model_tokens(model)
        )
    except Exception as e:
        error: SLHFError = domain_error(e)
        return Answer(error.status_code, _dumps(error_body(error)), None, 0)


async def answer(service: Service, endpoint: Endpoint, body: object) -> tuple[int, dict[str, Any]]:
    """(status, parsed body) of ``answer_row``."""
    got = await answer_row(service, endpoint, body)
    return got.status, json.loads(got.body)


def model_tokens(model: BaseModel) -> int:
    """Generated tokens of an answer's model: ``usage.completion_tokens`` (``output_tokens`` in
    the Responses API's usage)."""
    usage = getattr(model, "usage", None)
    tokens = getattr(usage, "completion_tokens", getattr(usage, "output_tokens", 0))
    return tokens if isinstance(tokens, int) else 0


# -- progress -----------------------------------------------------------------------------------
class Progress:
    """rows/s and tokens/s: a tqdm bar on a terminal, else a line every ``every_s`` seconds."""

    def __init__(
        self, total: int, stream: IO[str] | None = None, every_s: float = PROGRESS_EVERY_S
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.rows = 0
        self.tokens = 0
        self.every_s = every_s
        self.start = self._last = time.monotonic()
        self.bar: Any = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", file=self.stream, dynamic_ncols=True)

    def update(self, tokens: int) -> None:
        self.rows += 1
        self.tokens += tokens
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.start, 1e-9):.0f} tok/s")
        elif now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        s = max(now - self.start, 1e-9)
        print(
            f"slhf batch: {self.rows}/{self.total} rows, {self.rows / s:.2f} rows/s, "
            f"{self.tokens / s:.0f} tokens/s",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._line(time.monotonic())


# -- the run ------------------------------------------------------------------------------------
@dataclass
class BatchReport:
    rows: int = 0
    """Rows in the input."""
    skipped: int = 0
    """Rows already in the output (resumed)."""
    written: int = 0
    """Lines written by this run (any status)."""
    errors: int = 0
    """Of those, lines that are not a 200."""
    retry: list[str] = field(default_factory=list)
    """custom_ids of rows failed on the server side (5xx): not written, a re-run retries them."""
    completion_tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        text = (
            f"slhf batch: {self.written} written ({self.errors} errors), {self.skipped} "
            f"already done, {len(self.retry)} to retry; {rate:.2f} rows/s, "
            f"{self.completion_tokens / max(self.seconds, 1e-9):.0f} tokens/s"
        )
        if self.retry:
            text += f"\nre-run the same command to retry: {', '.join(self.retry[:10])}"
            text += " ..." if len(self.retry) > 10 else ""
        return text


async def run_batch(
    service: Service,
    input_path: Path,
    output_path: Path,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress_stream: IO[str] | None = None,
) -> BatchReport:
    """Answer every row of ``input_path`` not yet in ``output_path``, ``concurrency`` at once."""
    keys = scan_input(input_path)
    done = recover_output(output_path)
    report = BatchReport(rows=len(keys), skipped=sum(k in done for k in keys))
    progress = Progress(report.rows - report.skipped, progress_stream)
    writer = OutputWriter(output_path)
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[None]] = set()
    max_body = service.settings.max_body_bytes
    t0 = time.perf_counter()

    def emit(line: bytes, ok: bool, tokens: int) -> None:
        writer.write_line(line)
        report.written += 1
        report.errors += not ok
        report.completion_tokens += tokens
        progress.update(tokens)

    async def run_row(row: Row) -> None:
        try:
            got = await answer_row(service, row.endpoint, row.body)
            if got.status >= 500:
                report.retry.append(row.custom_id)
                return
            emit(answered_line(row.custom_id, got), got.status == 200, got.tokens)
        finally:
            slots.release()

    try:
        for number, raw in read_lines(input_path):
            parsed = parse_line(number, raw, max_body)  # the line's JSON parsed once
            cid = parsed.custom_id if isinstance(parsed, Row) else parsed["custom_id"]
            if line_key(cid, number) in done:
                continue
            if isinstance(parsed, dict):
                status = (parsed["response"] or {}).get("status_code")
                emit(_dumps(parsed) + b"\n", status == 200, 0)
                continue
            await slots.acquire()
            task = asyncio.create_task(run_row(parsed))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    finally:
        for task in running:
            task.cancel()
        writer.close()
        progress.close()
        report.seconds = time.perf_counter() - t0
    return report


# -- the command --------------------------------------------------------------------------------
class UnreadMetrics(ServiceMetrics):
    """The service's metrics in a batch, where no ``/metrics`` reads them: finished rows are not
    observed (the batch's own report counts rows and tokens)."""

    def observe_outcome(self, outcome: RefineOutcome) -> None:
        pass


BATCH_ONLY = ("input", "output", "concurrency")
"""``slhf batch``'s own arguments; the others are settings (as ``slhf serve``'s)."""


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="the batch file: one request a line (JSONL)")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="results (JSONL); appended to, resumed"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"rows in flight at once (default {DEFAULT_CONCURRENCY})",
    )


async def _run(settings: Any, weights: Any, args: argparse.Namespace) -> BatchReport:
    from slhf_server.admission import Admission
    from slhf_server.lifecycle import frozen_startup_heap
    from slhf_server.upstream import UpstreamClient
    from slhf_server.vllm_engine import VllmEngine

    engine = VllmEngine.start(weights, settings)
    upstream = UpstreamClient.from_settings(settings)
    metrics = UnreadMetrics()
    # the batch bounds its rows itself (--concurrency): admission never refuses one
    admission = Admission(2**62, metrics)
    service = Service.build(settings, weights, engine, upstream, admission, metrics)
    try:
        with frozen_startup_heap():
            return await run_batch(service, args.input, args.output, concurrency=args.concurrency)
    finally:
        if upstream is not None:
            await upstream.aclose()
        await engine.shutdown()


def run(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Check the input, the output and the settings (exit 2 on any problem, before the engine
    starts), then run the batch: exit 0, or 1 when rows are left to retry."""
    from slhf_models.serving.manifest import ManifestError
    from slhf_server.app import resolve_served_weights
    from slhf_server.lifecycle import exit_process
    from slhf_server.logs import configure_logging
    from slhf_server.preflight import (
        StartupError,
        check_block_size,
        check_drafting,
        check_weights,
        vllm_cpu_build,
    )
    from slhf_server.settings import ServerSettings

    if args.concurrency < 1:
        print("slhf batch: --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        keys = scan_input(args.input)
        done = recover_output(args.output)
    except (InputError, OSError) as e:
        print(f"slhf batch: {e}", file=sys.stderr)
        return 2
    if all(k in done for k in keys):
        print(f"slhf batch: all {len(keys)} rows are already in {args.output}", file=sys.stderr)
        return 0
    overrides.setdefault("log_format", "text")
    overrides.setdefault("log_level", "warning")
    # no /metrics to scrape in a batch: vLLM's Prometheus stat logger would only cost CPU
    # (about a tenth of this process's at the shipped model's speed; docs/batch.md)
    overrides.setdefault("engine_metrics", False)
    try:
        settings = ServerSettings(**overrides)
        weights = resolve_served_weights(settings)
        check_weights(weights)
        cpu = vllm_cpu_build()
        check_block_size(settings.kv_block_size, cpu=cpu)
        check_drafting(settings.speculative, cpu=cpu)
    except (ValueError, ManifestError, StartupError) as e:
        print(f"slhf batch: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        report = asyncio.run(_run(settings, weights, args))
    except KeyboardInterrupt:  # what is written stays; the same command resumes
        print("slhf batch: interrupted; re-run the same command to resume", file=sys.stderr)
        exit_process(130)
    print(report.summary(), file=sys.stderr, flush=True)
    # the output is closed and synced: end now, without vLLM's slow interpreter teardown
    exit_process(1 if report.retry else 0)
    return 0
