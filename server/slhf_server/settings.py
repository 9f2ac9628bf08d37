"""Server settings, read from ``SLHF_*`` environment variables (and CLI flags of ``slhf serve``).

The app never reads a global settings object: ``create_app(settings)`` stores the instance on
the app and routes get it through a dependency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SCHEMA_COMPILE_TIMEOUT_S = 0.2
"""Default of ``schema_compile_timeout_s`` (SLHF_SCHEMA_COMPILE_TIMEOUT_S)."""
MAX_SCHEMA_COMPILE_TIMEOUT_S = 5.0
"""Its largest value: vLLM's own pass over an accepted schema holds the event loop about as
long, and every request waits meanwhile."""
MAX_API_SERVERS = 64
"""Most API processes ``SLHF_API_SERVERS`` may ask for: a sanity bound (each one imports vLLM and
holds its own tokenizers, hundreds of MiB)."""


class ServerSettings(BaseSettings):
    """Every field can be set as ``SLHF_<FIELD NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SLHF_", extra="ignore", validate_default=True)

    # -- what to serve ------------------------------------------------------------------------
    model: str | None = None
    """Model folder or HF id. A folder may hold an ``slhf.json`` manifest (adapters, template,
    defaults). Unset: the shipped demo model (models/slhf_models/weights/slhf-condorcet-tiny,
    trained by
    ``make demo-model``; no download)."""
    follower_model: str | None = None
    """A separate Follower model (topology "separate") when the model has no manifest saying so."""
    served_model_name: str | None = None
    """Model id in the API; default: the manifest's name, else the folder name / HF id."""
    topology: Literal["auto", "shared", "lora", "separate"] = "auto"
    """"auto" follows the manifest; an explicit value must agree with it (checked at start)."""
    max_rounds: int = Field(8, ge=0, le=64)
    """Largest ``rounds`` a request may ask for."""
    default_rounds: int | None = Field(None, ge=0)
    """Rounds when a request names none; default: the manifest's ``default_rounds``."""
    trust_remote_code: bool = False
    revision: str | None = None

    # -- engine -------------------------------------------------------------------------------
    max_model_len: int | None = Field(None, ge=16)
    """Context length per engine; default: the manifest's, else the model's."""
    dtype: str = "auto"
    kv_cache_gb: float = Field(1.0, gt=0)
    """KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE) in GiB."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """Share of GPU memory for the engine(s); split between the two in topology "separate"."""
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    engine_niceness: int | None = Field(None, ge=0, le=19)
    """Scheduling niceness given to vLLM's engine processes once they run (``nice``; lowering a
    child's priority needs no privilege); unset: 10 on CPU, 0 (unchanged) on GPU. On a small CPU
    box the engine processes busy-wait for work and can starve the API process that feeds them;
    at a lower priority they yield to it. See docs/performance.md."""
    enable_prefix_caching: bool = True
    kv_block_size: int | None = Field(None, ge=1)
    """Tokens per KV-cache block (vLLM's ``--block-size``); unset: vLLM's default, 16 on GPU and
    128 on CPU. The prefix cache reuses whole blocks only, so a prompt shorter than one block
    never hits it: on CPU, 32 lets short prompts share their prefix across refinement rounds."""
    speculative: Literal["off", "ngram", "suffix"] = "off"
    """Draft Follower rounds from their prompt (the previous answer) and check the drafts in one
    step: "ngram" looks up the last generated tokens in the prompt and output and proposes what
    followed them (vLLM's prompt lookup); "suffix" is vLLM's suffix decoding (needs the
    ``arctic-inference`` package); "off" generates one token per step. Greedy output is
    unchanged; seeded sampling may differ. On vLLM's CPU build it needs slhf's vLLM plugin,
    which mends vllm-cpu 0.32's draft sampler (``VLLM_PLUGINS`` must not leave it out). See
    docs/performance.md."""
    speculative_tokens: int = Field(5, ge=1, le=64)
    """Most draft tokens proposed per step (vLLM's ``num_speculative_tokens``)."""
    speculative_lookup_min: int = Field(2, ge=1)
    """"ngram": the shortest run of last tokens looked up in the prompt and output."""
    speculative_lookup_max: int = Field(5, ge=1)
    """"ngram": the longest run of last tokens looked up (the longest match wins)."""
    enforce_eager: bool = False
    max_lora_rank: int = Field(64, ge=1)
    engine_args: dict[str, Any] = {}  # pydantic copies a mutable default per instance
    """More of vLLM's engine arguments (``AsyncEngineArgs`` field names → values, a JSON object
    in ``SLHF_ENGINE_ARGS``; ``slhf serve`` fills it from ``vllm serve``'s engine flags), given
    to every engine the topology starts: e.g. ``{"kv_cache_dtype": "fp8",
    "max_num_batched_tokens": 8192}``. Fields slhf has a setting for, or that the topology
    decides, are refused at start (server/slhf_server/engine_flags.py)."""
    engine_metrics: bool = True
    """Export vLLM's own ``vllm:*`` Prometheus metrics at ``/metrics``."""
    seed: int = 0
    """Engine seed (requests without a seed still sample randomly)."""

    # -- HTTP ---------------------------------------------------------------------------------
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api_servers: int = Field(1, ge=1, le=MAX_API_SERVERS)
    """API processes answering HTTP on ``host:port``, all sharing one engine (``vllm serve
    --api-server-count``): on a GPU, where one API process's CPU is the bottleneck, 2..8 keep
    the engine busy. 1 (the default) is one process holding the engine. Above 1: topology
    "separate" is refused; ``/metrics`` sums every process's counters, whichever answers;
    ``SLHF_MAX_INFLIGHT_GENERATIONS`` bounds them all together; each response names the process
    that answered in ``x-slhf-api-server``. See docs/deploy.md, "Scale out"."""
    api_keys: str | None = None
    """Comma-separated API keys; unset (and no keys file) = no auth."""
    api_keys_file: Path | None = None
    """A file with one API key per line (blank lines and ``#`` comments ignored), added to
    ``api_keys``."""
    metrics_require_auth: bool = False
    """Whether ``/metrics`` needs an API key too (``/health`` and ``/ready`` never do)."""
    playground: bool = True
    """Serve the refinement trace viewer at ``/playground`` (behind the API keys like ``/v1``;
    a browser may give the key as the password of its login prompt)."""
    log_format: Literal["json", "text"] = "json"
    """"json": every line the server writes is one JSON object (ours with the request id;
    uvicorn's, vLLM's and any other output wrapped); "text": plain lines."""

    otlp_traces_endpoint: str | None = None
    """OpenTelemetry traces: the OTLP/HTTP (protobuf) collector to send spans to, e.g.
    ``http://otel-collector:4318`` (``/v1/traces`` is added to a URL without a path); unset: no
    tracing. One span per request (joining the caller's W3C ``traceparent``), one per round, one
    for the upstream call; vLLM's engine sends its own request spans there too, as children of
    the rounds, unless its ``otlp_traces_endpoint`` engine argument names another. Needs the
    ``otel`` extra. See docs/observability.md."""

    # -- admission control and limits -------------------------------------------------------
    max_inflight_generations: int = Field(64, ge=1)
    """Admission bound: the in-flight work, in generations. A request weighs
    ``n x (rounds + 1)``; one that would exceed the bound gets a 429 with Retry-After. 64 keeps
    a 2-core CPU box responsive; on a GPU raise it to a few times ``max_num_seqs``."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request body (413 above it)."""
    body_timeout_s: float = Field(30.0, gt=0)
    """Seconds a client has to send its whole request body once the request started; a body
    still incomplete then (a ``Content-Length`` larger than what is sent) gets a 408 and the
    connection is closed."""
    header_timeout_s: float = Field(10.0, gt=0)
    """Seconds a client has to send a request's line and headers, from the moment the
    connection opens (or the request's first byte on a kept-alive connection); a client still
    sending them then gets a 408 and the connection is closed (``slhf serve``)."""
    max_tokens_cap: int = Field(8192, ge=1)
    """Largest ``max_tokens`` a request may ask for, per role and round."""
    max_n: int = Field(16, ge=1, le=128)
    """Largest number of choices (``n`` x prompts) of one OpenAI request."""
    max_schema_bytes: int = Field(32 * 1024, ge=64)
    """Largest JSON schema of a structured-output request (``response_format``), in bytes of
    compact JSON; a larger one is a 400."""
    max_schema_depth: int = Field(32, ge=2)
    """Deepest nesting of objects and lists in a JSON schema; a deeper one is a 400."""
    schema_compile_timeout_s: float = Field(
        SCHEMA_COMPILE_TIMEOUT_S, gt=0, le=MAX_SCHEMA_COMPILE_TIMEOUT_S
    )
    """Seconds a new JSON schema may take to become a grammar, on a worker thread, before it is
    refused (a 400). vLLM turns an accepted schema into a grammar once more on the event loop,
    which then waits about as long, so this bounds that stall too (at most 5 s; docs/wire.md,
    "Structured outputs")."""
    default_deadline_s: float | None = Field(None, gt=0)
    """Deadline of a request that names none (seconds); unset = ``max_deadline_s``."""
    max_deadline_s: float = Field(600.0, gt=0)
    """Largest deadline a request may ask for; longer ones are capped to it."""
    drain_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM: seconds in-flight requests get to finish (new ones get 503) before the rest
    are aborted and the process exits 0."""
    shutdown_timeout_s: float = Field(10.0, gt=0)
    """After the drain: seconds the teardown may take (the engine gets half of it to stop its
    processes) before the process kills its children and exits anyway. The process is gone
    within ``drain_grace_s`` + 2 s + this of the first SIGTERM."""

    # -- upstream (first answers from another OpenAI-compatible server) ------------------------
    upstream_base_url: str | None = None
    """Base URL of an OpenAI-compatible server (as the OpenAI SDK's ``base_url``, e.g.
    ``http://host:8001/v1``) that can give the first answer, refined by our Follower."""
    upstream_model: str | None = None
    """Model id sent to the upstream server; required with ``upstream_base_url``."""
    upstream_api_key: str | None = None
    """Bearer token for the upstream server, if it needs one."""
    upstream_timeout_s: float = Field(60.0, gt=0)
    """Seconds the whole upstream answer may take (connecting, waiting, reading every byte)
    before the request gets a 504."""
    upstream_max_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    """Largest upstream answer body; a bigger one is a 502, refused as it arrives. The answer's
    text must also fit the Follower's context, by its length alone, before it is tokenized
    (docs/reliability.md)."""

    @field_validator(
        "model",
        "follower_model",
        "served_model_name",
        "upstream_base_url",
        "upstream_model",
        "upstream_api_key",
        "api_keys",
        "api_keys_file",
        "otlp_traces_endpoint",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.default_rounds is not None and self.default_rounds > self.max_rounds:
            raise ValueError(
                f"SLHF_DEFAULT_ROUNDS={self.default_rounds} exceeds "
                f"SLHF_MAX_ROUNDS={self.max_rounds}"
            )
        if self.speculative_lookup_min > self.speculative_lookup_max:
            raise ValueError(
                f"SLHF_SPECULATIVE_LOOKUP_MIN={self.speculative_lookup_min} exceeds "
                f"SLHF_SPECULATIVE_LOOKUP_MAX={self.speculative_lookup_max}"
            )
        if self.upstream_base_url is not None and self.upstream_model is None:
            raise ValueError(
                f"SLHF_UPSTREAM_BASE_URL={self.upstream_base_url} needs SLHF_UPSTREAM_MODEL "
                "(the model id to ask the upstream server for)"
            )
        return self

    def api_key_list(self) -> list[str]:
        """The configured API keys (``api_keys`` and ``api_keys_file``); empty = no auth."""
        keys = [k.strip() for k in (self.api_keys or "").split(",")]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [ln.strip() for ln in lines if not ln.strip().startswith("#")]
        return [k for k in keys if k]

    def deadline_s(self, requested: float | None) -> float:
        """A request's deadline in seconds: its own (or the default), capped by the maximum."""
        d = requested if requested is not None else self.default_deadline_s
        return self.max_deadline_s if d is None else min(d, self.max_deadline_s)
