"""What fits where: the trainer's peak memory per GPU, computed from a model's shape and a run's
settings (docs/trainer.md, "Memory"). Printed as the fit table of the docs, every row marked
"computed"; ``bench/train_memory.py`` measures real steps, and ``--check`` compares this model
with such a measurement at the measured settings.

The model of one StackelbergGDA step with shared weights (the default), per process:

- weights: the policy in ``dtype`` (sharded over the processes under FSDP); a full fine-tune's
  reference the same again (LoRA's reference is the base with the adapters disabled: nothing);
- what trains: LoRA adapters in float32 (weights, gradients, AdamW's two moments: 16 bytes per
  parameter), or every weight (gradients and two moments in ``dtype``, as torch's AdamW keeps
  them in the parameter's dtype), sharded under FSDP;
- activations of the scoring pass: ``batch / accumulation`` Follower rows, each as long as the
  longest Follower row (prompt, Leader answer, template tail, Follower answer), which score both
  roles in one pass (the Follower prompt spliced from the Leader's sequence). With gradient
  checkpointing each decoder layer keeps its input (``H`` values per token) and one layer's
  activations are live again during its backward; without it every layer keeps about
  ``12·H + 4·I`` values per token (projections' inputs and outputs, norms, residuals, LoRA's
  inputs, the MLP's gate, up and product; SDPA attention keeps no T×T matrix);
- the output head's chunk (``logprob_chunk_tokens`` positions × vocabulary in float32: logits,
  their softmax for the entropy, their gradient); under FSDP the head is sharded and the model's
  own logits of the answer positions (and their gradient) exist in ``dtype`` instead;
- generation's KV cache (``2 × batch`` rows of the Follower's length, K and V per layer: one
  call samples this batch's Follower answers and the next batch's Leader answers).

It leaves out allocator fragmentation, CUDA context (~0.5 GB) and framework buffers; the CPU
check below shows how far that goes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * (self.hidden + 2 * kv)  # q, k, v
        attention += (self.hidden + 2 * kv) if self.qkv_bias else 0
        attention += self.hidden * self.hidden  # o
        mlp = 3 * self.hidden * self.intermediate
        layer = attention + mlp + 2 * self.hidden  # two RMSNorms
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embed + self.hidden

    def lora_params(self, rank: int) -> int:
        """LoRA on every linear layer but the head (``all-linear``)."""
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        pairs = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
        return self.layers * sum(rank * (a + b) for a, b in pairs)


QWEN25_05B = Shape("Qwen2.5-0.5B", 24, 896, 4864, 14, 2, 151_936, tied=True, qkv_bias=True)
LLAMA31_8B = Shape("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128_256, tied=False, qkv_bias=False)


@dataclass(frozen=True)
class Run:
    use_lora: bool = True
    lora_r: int = 64
    dtype: str = "bfloat16"
    batch_size: int = 32
    prompt_tokens: int = 256
    max_new_tokens: int = 512
    template_tail: int = 32
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    logprob_chunk_tokens: int = 1024
    processes: int = 1
    fsdp: bool = False


def estimate(shape: Shape, run: Run) -> dict[str, float]:
    """Peak bytes per process, by part (GiB), and their sum ``total``."""
    b = BYTES[run.dtype]
    shard = run.processes if run.fsdp else 1
    params = shape.params()
    parts: dict[str, float] = {"weights": params * b / shard}
    if run.use_lora:
        lora = shape.lora_params(run.lora_r)
        parts["trainable (LoRA fp32: weights, grads, AdamW)"] = lora * 16
    else:
        parts["reference"] = params * b / shard
        parts["trainable (grads, AdamW in dtype)"] = 3 * params * b / shard
    follower_len = run.prompt_tokens + run.max_new_tokens + run.template_tail + run.max_new_tokens
    rows = run.batch_size // run.gradient_accumulation_steps  # Follower rows score both roles
    tokens = rows * follower_len
    per_token_layer = (12 * shape.hidden + 4 * shape.intermediate) * b
    if run.gradient_checkpointing:
        parts["activations"] = tokens * (shape.layers * shape.hidden * b + per_token_layer)
    else:
        parts["activations"] = tokens * shape.layers * per_token_layer
    parts["output head chunk"] = run.logprob_chunk_tokens * shape.vocab * 4 * 3
    if run.fsdp:  # the head is sharded: the model's logits from the Leader's answer to the end of
        # the Follower's (both roles' answer positions), and their gradient
        answers = 2 * run.max_new_tokens + run.template_tail + 1
        parts["output head chunk"] += rows * answers * shape.vocab * b * 2
    kv = 2 * shape.kv_heads * shape.head_dim * b * shape.layers
    parts["generation KV cache"] = 2 * run.batch_size * follower_len * kv  # one call, both roles
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


ROWS: list[tuple[str, Shape, Run]] = [
    ("0.5B LoRA r=64, the paper's defaults", QWEN25_05B, Run()),
    ("0.5B LoRA, no gradient checkpointing", QWEN25_05B, Run(gradient_checkpointing=False)),
    (
        "0.5B LoRA, no checkpointing, accumulation 4",
        QWEN25_05B,
        Run(gradient_checkpointing=False, gradient_accumulation_steps=4),
    ),
    ("0.5B full fine-tune", QWEN25_05B, Run(use_lora=False)),
    ("8B LoRA r=64", LLAMA31_8B, Run()),
    ("8B LoRA r=64, accumulation 4", LLAMA31_8B, Run(gradient_accumulation_steps=4)),
    ("8B full fine-tune, one GPU", LLAMA31_8B, Run(use_lora=False)),
    (
        "8B full fine-tune, FSDP over 8 GPUs, batch 4 per GPU",
        LLAMA31_8B,
        Run(use_lora=False, fsdp=True, processes=8, batch_size=4),
    ),
]
GPUS = (24, 40, 80)


def table() -> str:
    lines = [
        "| setting (batch 32 prompts × 512 new tokens unless said; bf16; checkpointing on) "
        "| weights | trainable | activations | head chunk | KV cache | total GiB | "
        + " | ".join(f"fits {g} GiB" for g in GPUS)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(GPUS),
    ]
    for name, shape, run in ROWS:
        e = estimate(shape, run)
        weights = e["weights"] + e.get("reference", 0.0)
        trainable = next(v for k, v in e.items() if k.startswith("trainable"))
        fits = ["yes" if e["total"] <= g * 0.95 else "no" for g in GPUS]  # 5% for the allocator
        lines.append(
            f"| {name} (computed) | {weights:.1f} | {trainable:.1f} | {e['activations']:.1f} "
            f"| {e['output head chunk']:.1f} | {e['generation KV cache']:.1f} "
            f"| **{e['total']:.1f}** | " + " | ".join(fits) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", type=Path, help="a bench/train_memory.py JSON to compare with")
    args = ap.parse_args()
    print(table())
    if args.check:
        print()
        print(check(json.loads(args.check.read_text())))


def check(measured: dict[str, object]) -> str:
    """This model at a measurement's own settings (fp32, CPU, its batch and lengths) next to the
    measured step peak (peak RSS minus RSS after loading)."""
    settings = measured.get("settings", {})
    assert isinstance(settings, dict)
    lines = ["| mode | computed step GiB (activations + head + KV + trainable) | measured GiB |"]
    lines.append("|---|---|---|")
    for row in measured.get("results", []):  # type: ignore[union-attr]
        if not isinstance(row, dict) or row.get("system") != "ours":
            continue
        run = Run(
            use_lora=row.get("mode") == "lora",
            dtype=str(settings.get("dtype", "float32")),
            batch_size=int(settings.get("batch_size", 8)),
            prompt_tokens=int(settings.get("prompt_tokens", 64)),
            max_new_tokens=int(settings.get("max_new_tokens", 64)),
            gradient_checkpointing=bool(settings.get("gradient_checkpointing", False)),
        )
        e = estimate(QWEN25_05B, run)
        step = e["total"] - e["weights"] - e.get("reference", 0.0)
        lines.append(f"| {row.get('mode')} | {step:.2f} | {row.get('step_peak_gib', '?')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
