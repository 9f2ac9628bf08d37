"""``slhf train CONFIG.yaml [key=value ...]``: train, then write servable weights + slhf.json.

The YAML holds ``StackelbergConfig`` fields; ``key=value`` arguments override them. The
preference comes from the ``preference`` setting, one of::

    callable:MODULE:FUNCTION      fn(prompt, a, b) -> float in [0, 1], imported from MODULE
    reward_model:PATH             a Bradley–Terry reward model folder (one-output classifier)
    judge:BASE_URL:MODEL          an OpenAI-compatible judge, e.g.
                                  judge:http://127.0.0.1:8000/v1:gpt-4o-mini
                                  (API key from $SLHF_JUDGE_API_KEY, if set)
    task:NAME                     a synthetic task's preference (models/slhf_models/tasks):
    task:arith,
                                  task:condorcet

The final weights go to ``output_dir/final`` (adapters on a reference to the base model with
``use_lora: true``; full weights otherwise); checkpoints to ``output_dir/checkpoints``; metrics to
``output_dir/log.jsonl`` (evaluations on ``eval_dataset`` every ``eval_every`` steps too).

Multi-GPU runs go through accelerate (configs in recipes/accelerate/)::

    accelerate launch --config_file recipes/accelerate/fsdp.yaml \
        -m slhf_models.trainer.cli CONFIG.yaml
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from slhf_models.preferences import (
    CallablePreference,
    LLMJudgePreference,
    Preference,
    RewardModelPreference,
)
from slhf_models.trainer.config import ConfigError, StackelbergConfig

PREFERENCE_KINDS = ("callable", "reward_model", "judge", "task")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file of StackelbergConfig settings")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override it")
    p.add_argument("--merged", action="store_true", help="save LoRA runs as merged full weights")


def build_preference(spec: str | None) -> Preference:
    """Parse a preference spec (see the module docstring)."""
    if not spec:
        raise ConfigError(
            "preference must be set: callable:MODULE:FUNCTION, "
            "reward_model:PATH, judge:BASE_URL:MODEL or task:NAME"
        )
    kind, _, rest = spec.partition(":")
    if kind == "callable":
        module, _, name = rest.rpartition(":")
        if not module or not name:
            raise ConfigError(f"preference {spec!r} must look like callable:MODULE:FUNCTION")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(
                f"preference {spec!r}: cannot import {name} from {module}: {e}"
            ) from None
        return CallablePreference(fn)
    if kind == "reward_model" and rest:
        return RewardModelPreference.from_pretrained(rest)
    if kind == "judge":
        base_url, _, model = rest.rpartition(":")
        if not base_url.startswith(("http://", "https://")) or not model:
            raise ConfigError(f"preference {spec!r} must look like judge:BASE_URL:MODEL")
        return LLMJudgePreference(base_url, model, api_key=os.environ.get("SLHF_JUDGE_API_KEY"))
    if kind == "task":
        from slhf_models.tasks import task_module

        try:
            return task_module(rest).TaskPreference()
        except ValueError as e:
            raise ConfigError(f"preference {spec!r}: {e}") from None
    raise ConfigError(
        f"preference {spec!r}: unknown kind {kind!r}; use one of {', '.join(PREFERENCE_KINDS)}"
    )


def run_train(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slhf_models.trainer.checkpoint import CheckpointError
    from slhf_models.trainer.console import PreferenceFailureError
    from slhf_models.trainer.data import DataError, load_prompts
    from slhf_models.trainer.trainer import StackelbergTrainer
    from slhf_models.trainer.weights import torch_dtype

    try:
        cfg = StackelbergConfig.from_yaml(args.config, args.overrides)
        preference = build_preference(cfg.preference)
        prompts = load_prompts(cfg.dataset, split=cfg.dataset_split, field=cfg.prompt_field)
        eval_prompts = None
        if cfg.eval_dataset is not None:
            eval_prompts = load_prompts(cfg.eval_dataset, split="test", field=cfg.prompt_field)
    except (ConfigError, DataError) as e:
        print(f"slhf train: {e}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    dtype = torch_dtype(cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    ref_model = None
    if not cfg.use_lora:
        ref_model = AutoModelForCausalLM.from_pretrained(cfg.reference_model, dtype=dtype)
    trainer = StackelbergTrainer(
        model, ref_model, tokenizer, preference, prompts, cfg, eval_dataset=eval_prompts
    )
    try:
        trainer.train()
    except CheckpointError as e:
        print(f"slhf train: {e}", file=sys.stderr)
        return 2
    except PreferenceFailureError as e:
        print(f"slhf train: {e}", file=sys.stderr)
        return 1
    print(trainer.save_model(merged=args.merged))
    trainer.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slhf train", description=__doc__.split("\n")[0])
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
