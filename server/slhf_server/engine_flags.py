"""vLLM's own engine arguments on ``slhf serve`` and in ``SLHF_ENGINE_ARGS``.

``slhf serve`` reads every flag of ``vllm serve``'s engine (``AsyncEngineArgs.add_cli_args``,
vLLM's own parser: a new vLLM release brings its new flags, with vLLM's help text and errors)
beside slhf's own flags. Each engine field lands in one of three places:

- **an slhf setting** when slhf has one for it (``--max-model-len`` → ``max_model_len``,
  ``--block-size`` → ``kv_block_size``, ... ``AS_SETTINGS``): the same value, through the setting
  that the manifest, the topology and the checks already read;
- **refused** when the topology decides it (``OWNED``: the role models and tokenizers, LoRA
  slots), with the setting to use instead;
- **passed to every engine** the topology starts (``engine_args``: ``--kv-cache-dtype``,
  ``--quantization``, ``--max-num-batched-tokens``, ``--enable-chunked-prefill``,
  ``--data-parallel-size``, ``--otlp-traces-endpoint``, ``--speculative-config``, ...). In the
  "separate" topology both engines get them.

``SLHF_ENGINE_ARGS`` (a JSON object of ``AsyncEngineArgs`` field names) is the same for
deployments that set the environment; its keys are checked the same way when the engine starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

#: vLLM engine fields that are slhf settings (field → ServerSettings field).
AS_SETTINGS: dict[str, str] = {
    "model": "model",
    "served_model_name": "served_model_name",
    "max_model_len": "max_model_len",
    "dtype": "dtype",
    "seed": "seed",
    "revision": "revision",
    "trust_remote_code": "trust_remote_code",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_num_seqs": "max_num_seqs",
    "block_size": "kv_block_size",
    "enable_prefix_caching": "enable_prefix_caching",
    "enforce_eager": "enforce_eager",
    "max_lora_rank": "max_lora_rank",
}

#: vLLM engine fields the topology sets (field → what to use instead).
OWNED: dict[str, str] = {
    "tokenizer": "each role's engine loads its model's own tokenizer",
    "enable_lora": "topology 'lora' (a manifest with adapters) enables LoRA",
    "max_loras": "topology 'lora' serves the two role adapters",
    "disable_log_stats": "SLHF_ENGINE_METRICS",
    "enable_log_requests": "slhf logs requests itself (SLHF_LOG_LEVEL)",
}


class EngineFlagError(ValueError):
    """An engine argument slhf cannot take; the message names the setting to use."""


def engine_parser() -> argparse.ArgumentParser:
    """vLLM's parser of its engine flags (no ``-h``: ``slhf serve --help-engine`` prints it)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="slhf serve", add_help=False)  # type: ignore[no-untyped-call]
    return AsyncEngineArgs.add_cli_args(parser)


def split_serve_argv(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``slhf serve``'s arguments: the engine fields vLLM's parser recognises (only those given,
    converted by vLLM's types; an invalid value exits with vLLM's message) and the rest, for
    slhf's own parser."""
    parser = engine_parser()
    given, rest = parser.parse_known_args(list(argv))
    defaults = parser.parse_args([])
    fields = {k: v for k, v in vars(given).items() if v != getattr(defaults, k, None)}
    return fields, rest


def route(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Engine fields → ``(settings, engine_args)``; raises ``EngineFlagError`` for ``OWNED``."""
    settings: dict[str, Any] = {}
    engine_args: dict[str, Any] = {}
    for field, value in fields.items():
        if field in OWNED:
            raise EngineFlagError(f"--{_flag(field)} cannot be set: {OWNED[field]}")
        if field == "served_model_name":
            names = [value] if isinstance(value, str) else list(value or [])
            if len(names) != 1:
                raise EngineFlagError("--served-model-name takes one name here")
            value = names[0]
        if field in AS_SETTINGS:
            settings[AS_SETTINGS[field]] = value
        else:
            engine_args[field] = value
    return settings, engine_args


def check_engine_args(engine_args: Mapping[str, Any]) -> None:
    """``SLHF_ENGINE_ARGS``' keys: ``AsyncEngineArgs`` fields that are neither slhf settings nor
    set by the topology."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for field in engine_args:
        if field in AS_SETTINGS:
            env = "SLHF_" + AS_SETTINGS[field].upper()
            raise EngineFlagError(f"engine argument {field!r} is an slhf setting: set {env}")
        if field in OWNED:
            raise EngineFlagError(f"engine argument {field!r} cannot be set: {OWNED[field]}")
        if field not in known:
            raise EngineFlagError(
                f"engine argument {field!r} is not one of vLLM's (AsyncEngineArgs) fields"
            )


def _flag(field: str) -> str:
    return field.replace("_", "-")
