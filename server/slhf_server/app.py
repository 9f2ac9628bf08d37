"""App factory: ``create_app(settings)`` builds the FastAPI app; its lifespan loads the engine.

Engines load in the lifespan, never at import time: uvicorn opens the port once the model is
loaded, and a model that fails to load stops the process with the reason in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from slhf_models.serving.loading import ServedWeights, default_model_dir, resolve_weights
from slhf_server.admission import Admission
from slhf_server.engine import Engine
from slhf_server.errors import install_error_handlers
from slhf_server.lifecycle import frozen_startup_heap, install_drain
from slhf_server.logs import restyle_handlers
from slhf_server.metrics import ServiceMetrics
from slhf_server.middleware import AuthMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from slhf_server.openapi import install_openapi
from slhf_server.playground import PLAYGROUND_PATH, mount_playground
from slhf_server.routes import router
from slhf_server.routes_openai import router as openai_router
from slhf_server.routes_responses import router as responses_router
from slhf_server.service import Service
from slhf_server.settings import ServerSettings
from slhf_server.tracing import Tracing
from slhf_server.upstream import UpstreamClient

if TYPE_CHECKING:
    from slhf_server.api_servers import ApiServerSlot

logger = logging.getLogger("slhf_server")

EngineFactory = Callable[[ServedWeights, ServerSettings], Engine]


def resolve_served_weights(settings: ServerSettings) -> ServedWeights:
    """The weights ``settings`` name; the shipped default model when none is named."""
    return resolve_weights(
        settings.model or str(default_model_dir()),
        follower_model=settings.follower_model,
        topology=settings.topology,
        served_model_name=settings.served_model_name,
        revision=settings.revision,
    )


def _vllm_engine(weights: ServedWeights, settings: ServerSettings) -> Engine:
    from slhf_server.vllm_engine import (
        VllmEngine,  # imports vllm: only when a real engine is wanted
    )

    return VllmEngine.start(weights, settings)


def create_app(
    settings: ServerSettings | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    weights: ServedWeights | None = None,
    tracing: Tracing | None = None,
    api_server: ApiServerSlot | None = None,
    freeze_heap: bool | None = None,
) -> FastAPI:
    """Build the app. Tests pass a fake ``engine_factory`` (and ``weights``), and a ``tracing``
    on their own span exporter; otherwise ``SLHF_OTLP_TRACES_ENDPOINT`` decides. ``api_server``:
    this app is one of several API processes (``slhf_server.api_servers``). ``freeze_heap``:
    whether start-up's heap is frozen while the app serves (``lifecycle.frozen_startup_heap``);
    by default only with the real engine (its full collection at start costs a test that starts
    hundreds of apps in one process a second each)."""
    freeze = engine_factory is None if freeze_heap is None else freeze_heap
    settings = settings or ServerSettings()
    tracing = tracing or Tracing.from_settings(settings)
    factory = engine_factory or _vllm_engine
    if api_server is None:
        metrics = ServiceMetrics()
        admission = Admission(settings.max_inflight_generations, metrics)
    else:
        metrics = ServiceMetrics(multiprocess_dir=api_server.metrics_dir)
        admission = Admission(settings.max_inflight_generations, metrics, api_server.inflight)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        restyle_handlers(settings.log_format)
        served = weights or resolve_served_weights(settings)
        logger.info("serving %s (topology %s) from %s", served.name, served.topology, served.source)
        engine = factory(served, settings)
        restyle_handlers(settings.log_format)  # the handlers libraries added while loading
        upstream = UpstreamClient.from_settings(settings)
        if upstream is not None:
            logger.info("upstream: %s (model %s)", upstream.base_url, upstream.model)
        metrics.watch_engine(engine.num_running)
        service = Service.build(settings, served, engine, upstream, admission, metrics)
        app.state.service = service
        uninstall_drain = install_drain(
            admission, settings.drain_grace_s, settings.shutdown_timeout_s
        )
        lag_probe = asyncio.create_task(metrics.watch_loop_lag())
        try:
            with frozen_startup_heap() if freeze else contextlib.nullcontext():
                yield
        finally:
            uninstall_drain()
            lag_probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_probe
            app.state.service = None
            service.refiner.prompts.close()
            if upstream is not None:
                await upstream.aclose()
            await engine.shutdown()
            if tracing is not None:  # the last spans out, off the event loop
                await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(title="SLHF refinement server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.service = None
    app.state.metrics = metrics
    app.state.admission = admission
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(responses_router)
    if settings.playground:
        mount_playground(app)
    open_paths = ["/health", "/ready"] + ([] if settings.metrics_require_auth else ["/metrics"])
    app.add_middleware(
        AuthMiddleware,
        keys=settings.api_key_list(),
        open_paths=open_paths,
        browser_prefix=PLAYGROUND_PATH,
    )
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    # added last: outermost
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        tracing=tracing,
        headers=[] if api_server is None else [api_server.header()],
    )
    return app


def run_app(
    app: FastAPI, settings: ServerSettings, log_config: dict[str, Any], sock: socket.socket
) -> bool:
    """Serve ``app`` with uvicorn on ``sock`` (bound, listened on once the app has started)
    until it stops; returns whether it started."""
    import uvicorn

    from slhf_server.header_timeout import header_timeout_protocol

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config,
        access_log=False,
        timeout_graceful_shutdown=30,
        http=header_timeout_protocol(settings.header_timeout_s),
    )
    server = uvicorn.Server(config)
    with sock:
        server.run(sockets=[sock])
    return bool(server.started)
