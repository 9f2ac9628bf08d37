"""Hostile request bodies as hypothesis strategies, shared by the fuzz tests (unit: fake engine,
in-process; integration: a real server with real vLLM), and the invariant they check.

Bodies start valid and get some fields replaced by hostile values: unicode edge cases (lone
surrogates, NUL, RTL overrides, 4-byte characters, combining marks, BOM), extreme numbers (2**64,
-2**70, NaN, Infinity, 1e308), odd types (lists, objects, booleans, null, strings for numbers),
unknown fields; some are not JSON at all (invalid UTF-8, truncated, 50,000 levels deep).

The invariant: a 200 (a stream without an internal error event), or a 4xx with the OpenAI error
envelope -- or the documented 504 of a deadline the request itself made too short; never another
5xx.
"""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

EDGE_CHARS = [
    "\ud800",  # lone high surrogate
    "\udfff",  # lone low surrogate
    "\x00",  # NUL
    "\u202e",  # right-to-left override
    "\u200f",  # right-to-left mark
    "\U0001f600",  # 4-byte (astral) character
    "\U0010ffff",  # the last code point
    "\u0301",  # combining acute accent
    "\ufeff",  # byte order mark
    "\uffff",  # a noncharacter
    "\n",
    '"',
    "\\",
]
TEXT = st.lists(
    st.one_of(st.sampled_from(EDGE_CHARS), st.characters(exclude_categories=())), max_size=24
).map("".join)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 16, 17, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 2.0000001, 10.0]),
)
ODD = st.one_of(
    st.none(),
    st.booleans(),
    NUMBERS,
    TEXT,
    st.sampled_from(["yes", "10", "true", "", " ", "null"]),
    st.lists(st.one_of(st.integers(), TEXT), max_size=3),
    st.dictionaries(TEXT, st.integers(), max_size=2),
)
Strategies = dict[str, st.SearchStrategy[object]]


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of a bounded, repeatable fuzz run: ``examples`` cases, no shrinking
    (a failure is reported as found), no example database, no deadline or health checks."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


def one_field(base: dict[str, object], fields: Strategies) -> st.SearchStrategy[dict]:
    """``base`` (a valid body) with one of ``fields`` set to a value of its strategy (a
    conversation replaces the prompt)."""

    def mutate(key: str) -> st.SearchStrategy[dict]:
        rest = {k: v for k, v in base.items() if not (key == "messages" and k == "prompt")}
        return fields[key].map(lambda value: {**rest, key: value})

    return st.sampled_from(sorted(fields)).flatmap(mutate)


def some_fields(base: dict[str, object], fields: Strategies) -> st.SearchStrategy[dict]:
    """``base`` with any number of ``fields`` set (most bodies are then invalid many times)."""
    return st.fixed_dictionaries({}, optional=fields).map(lambda extra: {**base, **extra})


def hostile(fields: Strategies, base: dict[str, object]) -> st.SearchStrategy[dict]:
    return st.one_of(one_field(base, fields), one_field(base, fields), some_fields(base, fields))


SCHEMAS = st.one_of(
    st.sampled_from(
        [
            {"type": "object"},
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "string", "maxLength": 3},
            {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
            {"enum": ["a", "b"]},
            {"$ref": "#/$defs/missing"},
            {"type": 5},
            {"type": "object", "properties": "x"},
            {"type": "string", "pattern": "(a+)+b"},
            {"type": "string", "pattern": "["},
        ]
    ),
    st.recursive(
        st.dictionaries(st.sampled_from(["type", "items", "x"]), ODD, max_size=2),
        lambda inner: st.dictionaries(st.sampled_from(["properties", "items", "anyOf"]), inner),
        max_leaves=6,
    ),
)
JSON_SCHEMA_FIELDS: Strategies = {
    "name": st.one_of(TEXT, ODD),
    "schema": st.one_of(SCHEMAS, ODD),
    "strict": st.one_of(st.booleans(), ODD),
    "description": st.one_of(TEXT, ODD),
}
RESPONSE_FORMAT_FIELDS: Strategies = {
    "type": st.one_of(st.sampled_from(["text", "json_object", "json_schema"]), TEXT, ODD),
    "json_schema": st.one_of(st.fixed_dictionaries({}, optional=JSON_SCHEMA_FIELDS), ODD),
}
RESPONSE_FORMATS = st.one_of(
    st.fixed_dictionaries({}, optional=RESPONSE_FORMAT_FIELDS),
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}]),
    SCHEMAS.map(lambda s: {"type": "json_schema", "json_schema": {"name": "a", "schema": s}}),
    st.fixed_dictionaries({"type": st.one_of(TEXT, ODD), "json_schema": ODD}),
    ODD,
)
LOGIT_BIAS = st.one_of(
    st.dictionaries(
        st.sampled_from(["0", "1", "50", "99999999999", "-1", "x", "\ud800", ""]),
        st.one_of(st.floats(-100, 100), ODD),
        max_size=3,
    ),
    ODD,
)
FORMAT_FIELDS: Strategies = {
    "response_format": RESPONSE_FORMATS,
    "logprobs": st.one_of(st.booleans(), ODD),
    "top_logprobs": st.one_of(st.integers(0, 20), ODD),
    "logit_bias": LOGIT_BIAS,
}
SAMPLING_FIELDS: Strategies = {
    "max_tokens": st.one_of(st.integers(1, 16), ODD),
    "temperature": st.one_of(st.floats(0, 2), ODD),
    "top_p": st.one_of(st.floats(0.01, 1), ODD),
    "top_k": st.one_of(st.integers(-1, 100), ODD),
    "seed": st.one_of(st.integers(0, 2**63 - 1), ODD),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3), ODD),
    "source": st.one_of(st.just("leader"), ODD),
    # vLLM's extra sampling fields, per role
    "min_p": st.one_of(st.floats(0, 1), ODD),
    "repetition_penalty": st.one_of(st.floats(0.1, 2), ODD),
    "presence_penalty": st.one_of(st.floats(-2, 2), ODD),
    "frequency_penalty": st.one_of(st.floats(-2, 2), ODD),
    "min_tokens": st.one_of(st.integers(0, 8), ODD),
    "ignore_eos": st.one_of(st.booleans(), ODD),
    **FORMAT_FIELDS,
}
SAMPLING = st.one_of(hostile(SAMPLING_FIELDS, {"max_tokens": 4}), ODD)
PART_FIELDS: Strategies = {
    "type": st.one_of(st.just("text"), st.sampled_from(["image_url", "input_audio"]), ODD),
    "text": st.one_of(TEXT, ODD),
}
PARTS = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
        st.fixed_dictionaries({}, optional=PART_FIELDS),
    ),
    max_size=2,
)
MESSAGE_FIELDS: Strategies = {
    "role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer"]), ODD),
    "content": st.one_of(TEXT, PARTS, ODD),
    "name": st.one_of(TEXT, ODD),
}
MESSAGES = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"role": MESSAGE_FIELDS["role"]},
            optional={k: v for k, v in MESSAGE_FIELDS.items() if k != "role"},
        ),
        min_size=0,
        max_size=3,
    ),
    ODD,
)
COMMON: Strategies = {
    "model": st.one_of(st.sampled_from(["tiny", "x:leader", "x@upstream"]), TEXT, ODD),
    "seed": st.one_of(st.integers(0, 2**63 - 1), ODD),
    "bogus_field": ODD,
}
REFINE_FIELDS: Strategies = {
    **COMMON,
    "prompt": st.one_of(TEXT, ODD),
    "messages": MESSAGES,
    "response": st.one_of(TEXT, ODD),
    "rounds": st.one_of(st.integers(0, 2), ODD),
    "leader": SAMPLING,
    "follower": SAMPLING,
    "stop_when_unchanged": st.one_of(st.booleans(), ODD),
    "deadline_s": st.one_of(st.floats(0.5, 20), ODD),
}
REFINE = hostile(
    REFINE_FIELDS,
    {"prompt": "Hello", "rounds": 1, "leader": {"max_tokens": 4}, "follower": {"max_tokens": 4}},
)
REFINEMENT_FIELDS: Strategies = {
    "rounds": st.one_of(st.integers(0, 2), ODD),
    "response": st.one_of(TEXT, ODD),
    "stop_when_unchanged": st.one_of(st.booleans(), ODD),
    "return_trace": st.one_of(st.booleans(), ODD),
    "stream_rounds": st.one_of(st.booleans(), ODD),
    "leader": SAMPLING,
    "follower": SAMPLING,
    "deadline_s": st.one_of(st.floats(0.5, 20), ODD),
}
STREAM_OPTIONS_FIELDS: Strategies = {
    "include_usage": st.one_of(st.booleans(), ODD),
    "continuous_usage_stats": st.one_of(st.booleans(), ODD),
}
UNSUPPORTED_VALUE = st.one_of(
    ODD, st.sampled_from([False, 0, {}, [], "none", {"type": "text"}, ["text"], 1, ""])
)
"""A declared but unsupported field: its neutral values (accepted) and others (400s)."""
OPENAI: Strategies = {
    **COMMON,
    "max_tokens": st.one_of(st.integers(1, 16), ODD),
    "temperature": st.one_of(st.floats(0, 2), ODD),
    "top_p": st.one_of(st.floats(0.01, 1), ODD),
    "n": st.one_of(st.integers(1, 3), ODD),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3), ODD),
    "stream": st.one_of(st.booleans(), ODD),
    "stream_options": st.one_of(st.fixed_dictionaries({}, optional=STREAM_OPTIONS_FIELDS), ODD),
    "user": st.one_of(TEXT, ODD),
    "metadata": st.one_of(st.dictionaries(TEXT, TEXT, max_size=2), ODD),
    "store": st.one_of(st.booleans(), ODD),
    "service_tier": st.one_of(st.sampled_from(["auto", "default"]), TEXT, ODD),
    **FORMAT_FIELDS,
    "top_k": st.one_of(st.integers(-1, 100), ODD),
    "min_p": st.one_of(st.floats(0, 1), ODD),
    "repetition_penalty": st.one_of(st.floats(0.1, 2), ODD),
    "presence_penalty": st.one_of(st.floats(-2, 2), ODD),
    "frequency_penalty": st.one_of(st.floats(-2, 2), ODD),
    "min_tokens": st.one_of(st.integers(0, 8), ODD),
    "ignore_eos": st.one_of(st.booleans(), ODD),
    "refinement": st.one_of(hostile(REFINEMENT_FIELDS, {"rounds": 1}), ODD),
}
CHAT_FIELDS: Strategies = {
    **OPENAI,
    "messages": MESSAGES,
    "max_completion_tokens": st.one_of(st.integers(1, 16), ODD),
    **{
        name: UNSUPPORTED_VALUE
        for name in (
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "parallel_tool_calls",
            "audio",
            "modalities",
            "prediction",
            "reasoning_effort",
            "web_search_options",
        )
    },
}
CHAT = hostile(CHAT_FIELDS, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
COMPLETION_FIELDS: Strategies = {
    **OPENAI,
    "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=3), ODD),
    # the legacy integer logprobs (0..5); chat's top_logprobs is refused here
    "logprobs": st.one_of(st.integers(0, 6), st.booleans(), ODD),
    **{name: UNSUPPORTED_VALUE for name in ("echo", "suffix", "best_of", "top_logprobs")},
}
COMPLETIONS = hostile(COMPLETION_FIELDS, {"prompt": "Hello", "max_tokens": 4})
INPUT_PART_FIELDS: Strategies = {
    "type": st.one_of(st.sampled_from(["input_text", "output_text", "input_image"]), ODD),
    "text": st.one_of(TEXT, ODD),
}
INPUT_ITEM_FIELDS: Strategies = {
    "type": st.one_of(st.sampled_from(["message", "function_call"]), ODD),
    "role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant"]), ODD),
    "content": st.one_of(
        TEXT, st.lists(st.fixed_dictionaries({}, optional=INPUT_PART_FIELDS), max_size=2), ODD
    ),
}
INPUT_ITEMS = st.one_of(
    st.lists(st.fixed_dictionaries({}, optional=INPUT_ITEM_FIELDS), max_size=3), ODD
)
RESPONSE_STREAM_OPTIONS_FIELDS: Strategies = {"include_obfuscation": st.one_of(st.booleans(), ODD)}
TEXT_FORMAT_FIELDS: Strategies = {
    "type": st.one_of(st.sampled_from(["text", "json_object", "json_schema"]), ODD),
    "name": st.one_of(TEXT, ODD),
    "schema": st.one_of(SCHEMAS, ODD),
    "strict": st.one_of(st.booleans(), ODD),
    "description": st.one_of(TEXT, ODD),
}
TEXT_CONFIG_FIELDS: Strategies = {
    "format": st.one_of(st.fixed_dictionaries({}, optional=TEXT_FORMAT_FIELDS), ODD),
    "verbosity": st.one_of(st.sampled_from(["low", "medium", "high"]), ODD),
}
RESPONSE_FIELDS: Strategies = {
    **{
        k: v
        for k, v in OPENAI.items()
        if k not in ("max_tokens", "n", "logprobs", "response_format", "stream_options")
    },
    "input": st.one_of(TEXT, INPUT_ITEMS),
    "instructions": st.one_of(TEXT, ODD),
    "max_output_tokens": st.one_of(st.integers(1, 16), ODD),
    "text": st.one_of(st.fixed_dictionaries({}, optional=TEXT_CONFIG_FIELDS), ODD),
    "stream_options": st.one_of(
        st.fixed_dictionaries({}, optional=RESPONSE_STREAM_OPTIONS_FIELDS), ODD
    ),
    "safety_identifier": st.one_of(TEXT, ODD),
    "prompt_cache_key": st.one_of(TEXT, ODD),
    "include": st.one_of(st.just(["message.output_text.logprobs"]), UNSUPPORTED_VALUE),
    **{
        name: UNSUPPORTED_VALUE
        for name in (
            "previous_response_id",
            "conversation",
            "prompt",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "max_tool_calls",
            "background",
            "background_options",
            "reasoning",
            "truncation",
            "context_management",
            "prompt_cache_options",
            "prompt_cache_retention",
            "moderation",
            "image",
            "access_programs",
        )
    },
}
RESPONSES = hostile(RESPONSE_FIELDS, {"input": "Hello", "max_output_tokens": 4})
CORPUS: dict[str, Strategies] = {
    "/v1/refine": REFINE_FIELDS,
    "/v1/chat/completions": CHAT_FIELDS,
    "/v1/completions": COMPLETION_FIELDS,
    "/v1/responses": RESPONSE_FIELDS,
}
"""Each route's top-level fields; nested ones in ``NESTED`` (checked against the wire models:
tests/unit/server/test_fuzz.py)."""
NESTED: dict[str, Strategies] = {
    "leader": SAMPLING_FIELDS,
    "follower": SAMPLING_FIELDS,
    "messages": MESSAGE_FIELDS,
    "content": PART_FIELDS,
    "refinement": REFINEMENT_FIELDS,
    "stream_options": STREAM_OPTIONS_FIELDS | RESPONSE_STREAM_OPTIONS_FIELDS,
    "response_format": RESPONSE_FORMAT_FIELDS,
    "json_schema": JSON_SCHEMA_FIELDS,
    "input": INPUT_ITEM_FIELDS,
    "text": TEXT_CONFIG_FIELDS,
    "format": TEXT_FORMAT_FIELDS,
}
"""The fields of a nested object, by the name of the field that holds it."""


def corpus_paths(route: str) -> set[str]:
    """Every field path (``refinement.leader.min_p``) the corpus sets on ``route``."""

    def walk(fields: Strategies, prefix: str, depth: int) -> set[str]:
        out = set()
        for name in fields:
            out.add(prefix + name)
            if name in NESTED and depth < 4:
                out |= walk(NESTED[name], f"{prefix}{name}.", depth + 1)
        return out

    return walk(CORPUS[route], "", 0)


RAW = st.sampled_from(
    [
        b"\xff\xfe not utf-8",
        b'{"prompt": "unterminated',
        b"[" * 50_000 + b"]" * 50_000,
        b'{"prompt": "x", "rounds": 1e999}',
        b'{"prompt": "x", "rounds": ' + b"9" * 5000 + b"}",
        b"",
        b"null",
        b'"just a string"',
    ]
)
REQUESTS = st.one_of(
    st.tuples(st.just("/v1/refine"), REFINE),
    st.tuples(st.just("/v1/chat/completions"), CHAT),
    st.tuples(st.just("/v1/completions"), COMPLETIONS),
    st.tuples(st.just("/v1/responses"), RESPONSES),
    st.tuples(st.sampled_from(["/v1/refine", "/v1/chat/completions", "/v1/responses"]), RAW),
)


def violation(r: httpx.Response) -> str | None:
    """What is wrong with ``r`` under the invariant, or None."""
    if r.status_code == 200:
        if "internal_server_error" in r.text:
            return "200 stream with an internal error event"
        return None
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} without the error envelope: {r.text[:200]}"
    if set(err) != {"message", "type", "param", "code"}:
        return f"{r.status_code} envelope with keys {sorted(err)}"
    if r.status_code == 504 and err["code"] == "deadline_exceeded":
        return None
    return None if 400 <= r.status_code < 500 else f"{r.status_code}: {err['message'][:200]}"


def encode(body: object) -> bytes:
    """A request body as sent: JSON text with ``\\ud800`` escapes and ``NaN``; bytes as they are."""
    return body if isinstance(body, bytes) else json.dumps(body).encode()
