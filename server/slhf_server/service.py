"""The server's state, built once the engine is loaded: what every request is served with.

``Service`` holds the settings, the served weights, the engine and the refiner over it (one
template renderer per role), the upstream client, admission and the metrics -- and the served
model's ids and default rounds, which follow from them. It does nothing with a request: that is
``slhf_server.plan`` and ``slhf_server.pipeline``. Routes get it with ``ServiceDep`` (a 503 until
the model is loaded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from slhf_models.serving.loading import ServedWeights
from slhf_models.serving.templates import ROLES, TemplateRenderer
from slhf_server.admission import Admission
from slhf_server.engine import Engine
from slhf_server.errors import ServiceUnavailableError
from slhf_server.metrics import ServiceMetrics
from slhf_server.refine import Refiner
from slhf_server.settings import ServerSettings
from slhf_server.upstream import UpstreamClient

LEADER_SUFFIX = ":leader"
"""``<name>:leader``: the Leader's answer alone (0 rounds unless the request says otherwise)."""
UPSTREAM_SUFFIX = "@upstream"
"""``<name>@upstream`` (OpenAI routes): the upstream server's first answer, refined."""


@dataclass
class Service:
    settings: ServerSettings
    weights: ServedWeights
    engine: Engine
    refiner: Refiner
    upstream: UpstreamClient | None
    admission: Admission
    metrics: ServiceMetrics
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(
        cls,
        settings: ServerSettings,
        weights: ServedWeights,
        engine: Engine,
        upstream: UpstreamClient | None = None,
        admission: Admission | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> Service:
        template = weights.manifest.template.to_config()
        renderers = {role: TemplateRenderer(engine.tokenizer(role), template) for role in ROLES}
        refiner = Refiner(engine, renderers, upstream)
        metrics = metrics or ServiceMetrics()
        return cls(
            settings=settings,
            weights=weights,
            engine=engine,
            refiner=refiner,
            upstream=upstream,
            admission=admission or Admission(settings.max_inflight_generations, metrics),
            metrics=metrics,
        )

    @property
    def name(self) -> str:
        return self.weights.name

    @property
    def model_ids(self) -> list[str]:
        """The ids this server answers to: refined, Leader only, upstream (when configured)."""
        ids = [self.name, self.name + LEADER_SUFFIX]
        return ids + ([self.name + UPSTREAM_SUFFIX] if self.upstream is not None else [])

    @property
    def default_rounds(self) -> int:
        """Follower rounds of a request that names none (for ``<name>``)."""
        if self.settings.default_rounds is not None:
            return self.settings.default_rounds
        return min(self.weights.manifest.default_rounds, self.settings.max_rounds)


def get_service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        raise ServiceUnavailableError("the model is not loaded yet", code="not_ready")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
