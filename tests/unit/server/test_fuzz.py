"""Property-based fuzz against the app with a fake engine: the OpenAPI schema (schemathesis +
hypothesis), and the hostile bodies of tests/hostile_requests.py. Every request gets an answer
below 500 (or the documented 504 of a deadline that passed before the first answer). Bounded
by case counts."""

from __future__ import annotations

import typing
from collections import Counter

import schemathesis
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tests.fakes import ScriptedEngine, VllmLikeEngine, numbered_script
from tests.hostile_requests import (
    CORPUS,
    REQUESTS,
    corpus_paths,
    encode,
    fuzz_settings,
    violation,
)
from tests.unit.server.test_hardening import AUTH, KEY, make_app

CASES_PER_OPERATION = 200  # 7 operations: 1,400 cases


def test_fuzzed_requests_never_get_a_5xx() -> None:
    app = make_app(ScriptedEngine(numbered_script, context=512), api_keys=KEY)
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    with TestClient(app) as client:

        @given(case=st.one_of(*(op.as_strategy() for op in operations)))
        @settings(
            max_examples=CASES_PER_OPERATION * len(operations),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case: schemathesis.Case) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=AUTH)
            kwargs.pop("cookies", None)
            r = client.request(**kwargs)
            statuses[r.status_code] += 1
            # a deadline shorter than the first answer is a documented 504, not a server fault
            deadline = r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
            if r.status_code >= 500 and not deadline:
                failures.append(f"{kwargs['method']} {kwargs['url']} {kwargs.get('json')!r}")
            assert "error" in r.json() if r.status_code >= 400 else True

        run()
    total = sum(statuses.values())
    print(f"fuzz: {total} cases, statuses {dict(sorted(statuses.items()))}")
    assert not failures, failures[:5]
    assert total >= 1000


HOSTILE_EXAMPLES = 600


def test_hostile_bodies_get_200_or_4xx_envelopes() -> None:
    """The hostile bodies of the integration fuzz test (tests/hostile_requests.py), in-process
    against an engine that rejects what vLLM rejects: the same invariant, in seconds."""
    engine = VllmLikeEngine(numbered_script, context=512)
    app = make_app(engine, max_tokens_cap=16, max_deadline_s=5)
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    with TestClient(app) as client:

        @given(request=REQUESTS)
        @fuzz_settings(HOSTILE_EXAMPLES)
        def run(request: tuple[str, object]) -> None:
            path, body = request
            content = encode(body)
            r = client.post(path, content=content, headers={"Content-Type": "application/json"})
            statuses[r.status_code] += 1
            problem = violation(r)
            if problem:
                failures.append(f"POST {path} {content[:300]!r} -> {problem}")

        run()
        assert client.get("/health").status_code == 200
    print(f"hostile fuzz: statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert statuses[200] > 0 and sum(statuses.values()) == HOSTILE_EXAMPLES


def _model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field path a wire model accepts, nested models included."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        key = info.alias or name
        out.add(prefix + key)
        stack = [info.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                out |= _model_paths(t, f"{prefix}{key}.")
            else:
                stack.extend(typing.get_args(t))
    return out


def test_the_hostile_corpus_sets_every_field_every_route_accepts() -> None:
    """A field added to a wire model (a vLLM sampling extra, a new route's body) must be in
    the hostile corpus (tests/hostile_requests.py), or this fails naming it."""
    app = make_app(ScriptedEngine(numbered_script))
    bodies = {
        route.path: route.body_field.field_info.annotation
        for route in app.routes
        if isinstance(route, APIRoute) and route.body_field is not None
    }
    assert set(bodies) == set(CORPUS), "a route without a hostile corpus"
    for path, model in bodies.items():
        missing = _model_paths(model) - corpus_paths(path)
        assert not missing, f"{path}: the hostile corpus never sets {sorted(missing)}"
