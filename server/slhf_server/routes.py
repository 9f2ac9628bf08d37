"""The SLHF routes: health, readiness, metrics, the model list and ``/v1/refine``.

Thin: FastAPI parses and validates the body; ``/v1/refine`` is a one-choice plan
(``slhf_server.plan``) run on the request pipeline (``slhf_server.pipeline``); the route shapes
the answer. The OpenAI routes are
``slhf_server.routes_openai``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from slhf_server import pipeline
from slhf_server.json_answer import json_answer
from slhf_server.lifecycle import check_health, check_ready
from slhf_server.openapi import ERROR_RESPONSES
from slhf_server.plan import plan_refine
from slhf_server.protocol import ModelCard, ModelList, RefineRequest, RefineResponse
from slhf_server.service import Service, ServiceDep

router = APIRouter()


@router.get("/health")
async def health(service: ServiceDep) -> dict[str, str]:
    """Liveness: the process answers and its engine is alive."""
    await check_health(service.engine)
    return {"status": "ok"}


@router.get("/ready")
async def ready(service: ServiceDep) -> dict[str, str]:
    """Readiness: the engines are loaded and healthy, and the server is not draining."""
    await check_ready(service.engine, service.admission)
    return {"status": "ready", "model": service.name, "topology": service.weights.topology}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text: the service's ``slhf_*`` metrics and vLLM's ``vllm:*`` engine metrics."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _public_ref(ref: str) -> str:
    """A model reference fit to show any client: an HF id as is, a local folder by its name
    (never an absolute path of the serving machine)."""
    path = Path(ref).expanduser()
    return path.name if path.is_absolute() or path.exists() else ref


def _model_info(service: Service, verbose: bool) -> dict[str, object]:
    """What a client needs to use the model; with ``verbose``, the whole manifest too."""
    m = service.weights.manifest
    info: dict[str, object] = {
        "topology": service.weights.topology,
        "default_rounds": service.default_rounds,
        "max_rounds": service.settings.max_rounds,
        "template": m.template.model_dump(),
    }
    if verbose:
        info.update(source=service.weights.source, manifest=m.model_dump(mode="json"))
    return info


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(
    service: ServiceDep,
    verbose: Annotated[
        bool,
        Query(
            description="Add the whole weights manifest (provenance, adapters, per-role "
            "defaults) and the model's source as given to the server."
        ),
    ] = False,
) -> ModelList:
    """The served model (refined), its ``:leader`` variant (no refinement) and, when an upstream
    is configured, ``@upstream``; ``slhf`` holds topology, rounds and template."""
    info = _model_info(service, verbose)
    max_len = min(service.engine.max_model_len("leader"), service.engine.max_model_len("follower"))
    root = _public_ref(service.weights.source)

    def card(model_id: str, rounds: int, parent: str | None, **extra: object) -> ModelCard:
        return ModelCard(
            id=model_id,
            created=service.created,
            root=root,
            parent=parent,
            max_model_len=max_len,
            slhf={**info, "rounds": rounds, **extra},
        )

    cards = [
        card(service.name, service.default_rounds, None),
        card(service.model_ids[1], 0, service.name),
    ]
    if service.upstream is not None:
        upstream: dict[str, object] = {"model": service.upstream.model}
        if verbose:
            upstream["base_url"] = service.upstream.base_url
        cards.append(
            card(service.model_ids[2], service.default_rounds, service.name, upstream=upstream)
        )
    return ModelList(data=cards)


@router.post("/v1/refine", responses=ERROR_RESPONSES, response_model=RefineResponse)
async def refine(body: RefineRequest, request: Request, service: ServiceDep) -> Response:
    plan = plan_refine(service, body)
    [outcome] = await pipeline.run(service, request, plan)
    return await json_answer(
        lambda: RefineResponse(
            id=plan.request_id,
            created=int(time.time()),
            model=plan.model,
            leader=outcome.leader,
            rounds=outcome.rounds,
            final=outcome.final,
            stopped_reason=outcome.stopped_reason,
            usage=outcome.usage,
        )
    )
