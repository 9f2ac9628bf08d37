"""The bounds of vLLM's extra sampling fields on the wire are vLLM's own: a value at the bound
is accepted by both the wire model and vLLM, one past it is refused by both (a 400 from the
wire, never an engine error). No engine is started."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from vllm import SamplingParams as VllmSamplingParams
from vllm.exceptions import VLLMValidationError

from slhf_server.protocol import SamplingOptions

EDGES = [
    ("min_p", 0.0, -0.01),
    ("min_p", 1.0, 1.01),
    ("presence_penalty", -2.0, -2.01),
    ("presence_penalty", 2.0, 2.01),
    ("frequency_penalty", -2.0, -2.01),
    ("frequency_penalty", 2.0, 2.01),
    ("repetition_penalty", 1e-6, 0.0),
    ("min_tokens", 0, -1),
]


@pytest.mark.parametrize("field, ok, bad", EDGES)
def test_wire_bounds_are_vllms(field: str, ok: float, bad: float) -> None:
    SamplingOptions.model_validate({field: ok})
    VllmSamplingParams(**{field: ok})
    with pytest.raises(ValidationError):
        SamplingOptions.model_validate({field: bad})
    with pytest.raises(VLLMValidationError):
        VllmSamplingParams(**{field: bad})
