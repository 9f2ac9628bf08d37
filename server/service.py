"""What the routes share: the loaded engine, the refiner, the served model and its defaults."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from slhf.models.serving.loading import ServedWeights
from slhf.models.serving.manifest import SamplingDefaults
from slhf.models.serving.templates import ROLES, Role, TemplateRenderer
from slhf.server.admission import Admission, Ticket
from slhf.server.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from slhf.server.generation import Engine, EngineError, GenerationParams
from slhf.server.metrics import ServiceMetrics
from slhf.server.protocol import SamplingParams
from slhf.server.refine import Refiner
from slhf.server.settings import ServerSettings
from slhf.server.upstream import UpstreamClient

_EXTRAS = (
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
)
"""Sampling fields the manifest has no default for: unset = vLLM's neutral value."""

LEADER_SUFFIX = ":leader"
UPSTREAM_SUFFIX = "@upstream"


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

    # -- models -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.weights.name

    @property
    def model_ids(self) -> list[str]:
        ids = [self.name, self.name + LEADER_SUFFIX]
        return ids + ([self.name + UPSTREAM_SUFFIX] if self.upstream is not None else [])

    def resolve_model(self, requested: str | None) -> bool:
        """Check a request's ``model``; return True when it asks for the Leader only."""
        if requested is None or requested == self.name:
            return False
        if requested == self.name + LEADER_SUFFIX:
            return True
        raise ModelNotFoundError(requested, self.model_ids)

    def resolve_openai_model(self, requested: str | None) -> tuple[bool, bool]:
        """Check an OpenAI request's ``model``: (Leader only?, first answer from upstream?).

        ``<name>@upstream`` asks the upstream server for the first answer, then refines it.
        """
        if requested is not None and requested.endswith(UPSTREAM_SUFFIX):
            if requested != self.name + UPSTREAM_SUFFIX:
                raise ModelNotFoundError(requested, self.model_ids)
            return False, True
        return self.resolve_model(requested), False

    @property
    def default_rounds(self) -> int:
        if self.settings.default_rounds is not None:
            return self.settings.default_rounds
        return min(self.weights.manifest.default_rounds, self.settings.max_rounds)

    def check_rounds(self, rounds: int, param: str = "rounds") -> int:
        limit = self.settings.max_rounds
        if not 0 <= rounds <= limit:
            raise InvalidRequestError(
                f"{param} must be between 0 and {limit} (SLHF_MAX_ROUNDS); got {rounds}",
                param=param,
            )
        return rounds

    # -- sampling -----------------------------------------------------------------------------
    def role_defaults(self, role: Role) -> SamplingDefaults:
        return self.weights.manifest.role(role).sampling

    def generation_params(
        self, role: Role, given: SamplingParams | None, request_seed: int | None
    ) -> GenerationParams:
        """A role's request values over the manifest's defaults for that role."""
        d = self.role_defaults(role)
        g = given or SamplingParams()
        cap = self.settings.max_tokens_cap
        if g.max_tokens is not None and g.max_tokens > cap:
            raise InvalidRequestError(
                f"max_tokens is {g.max_tokens:,} for the {role}; the limit is {cap:,} "
                "(SLHF_MAX_TOKENS_CAP)",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        stop = g.stop if g.stop is not None else d.stop
        max_tokens = g.max_tokens if g.max_tokens is not None else min(d.max_tokens, cap)
        if g.min_tokens is not None and g.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens is {g.min_tokens:,} for the {role}, more than its max_tokens "
                f"({max_tokens:,})",
                param="min_tokens",
            )
        extras = g.model_dump(include=set(_EXTRAS), exclude_none=True)
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=g.temperature if g.temperature is not None else d.temperature,
            top_p=g.top_p if g.top_p is not None else d.top_p,
            top_k=g.top_k if g.top_k is not None else d.top_k,
            seed=g.seed if g.seed is not None else request_seed,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            **extras,
        )

    async def check_health(self) -> None:
        try:
            await self.engine.check_health()
        except EngineError as e:
            raise ServiceUnavailableError(str(e), code="engine_dead") from e

    async def check_ready(self) -> None:
        await self.check_health()
        if self.admission.draining:
            raise ServiceUnavailableError("the server is shutting down", code="draining")

    async def admit(self, choices: int, rounds: int) -> Ticket:
        """Admit ``choices`` refinements of ``rounds`` rounds, or raise 503 (engine dead,
        draining) / 429 (at capacity)."""
        if not self.admission.draining:
            await self.check_health()
        return self.admission.acquire(choices * (rounds + 1))


def get_service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        raise ServiceUnavailableError("the model is not loaded yet", code="not_ready")
    return service


def get_settings(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
