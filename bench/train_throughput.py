"""Training throughput (prompts/s): our StackelbergTrainer vs TRL's RLOOTrainer, in one run.

Both trainers get, on the same machine and in the same process:
- the same tiny Llama-family model (``slhf_models.tiny.build_tiny_model``, float32) with the same
  LoRA (rank, α, all linear layers, no dropout) and the same learning rate;
- the same prompts (chat messages, rendered with the model's chat template), the same batch in
  *prompts* per step, the same ``max_new_tokens``, temperature and step count;
- two generations per prompt: StackelbergGDA samples a Leader answer and a Follower answer,
  RLOO samples ``num_generations=2`` completions;
- a KL term to the reference (the base model under the disabled adapter) on both sides;
- a cheap programmatic signal: RLOO's reward is the completion length, our preference is
  "the longer answer wins" (the same signal as a pairwise preference);
- the same thread count (``torch.set_num_threads``), warm-up steps excluded from the timing.

Timing: wall time from the end of the last warm-up step to the end of the last step. Ours:
the per-step ``time_s`` the trainer logs (prompts → rollouts → preference → backward → step);
TRL: a ``TrainerCallback`` at the end of every optimiser step (TRL's logging is set to run
after the last step, so it is not timed). Repeats alternate which trainer runs first.

Run: ``.venv/bin/python bench/train_throughput.py [--batch 8 --max-new-tokens 32 --steps 6]``.
Writes ``bench/results/train_throughput.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["the map", "the river", "rain", "the sea", "trees", "the moon", "bread", "a bridge"]
QUESTIONS = ["What is {}?", "Tell me about {}.", "Why does {} matter?", "Describe {}."]
PROMPTS = [q.format(t) for t in TOPICS for q in QUESTIONS]  # 32 distinct prompts


def length_reward(completions: list[Any], **_: Any) -> list[float]:
    """RLOO reward: answer length in characters / 100 (conversational completions)."""
    return [len(c[0]["content"] if isinstance(c, list) else c) / 100 for c in completions]


def longer_wins(x: Any, a: str, b: str) -> float:
    """Our preference: the same signal, pairwise."""
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


def run_ours(model_dir: Path, out: Path, args: argparse.Namespace) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slhf_models.preferences import CallablePreference
    from slhf_models.trainer.config import StackelbergConfig
    from slhf_models.trainer.trainer import StackelbergTrainer

    cfg = StackelbergConfig(
        model=str(model_dir),
        dataset="bench",
        output_dir=str(out),
        batch_size=args.batch,
        max_new_tokens=args.max_new_tokens,
        temperature=0.9,
        steps=args.warmup + args.steps,
        lora_r=args.lora_r,
        lora_alpha=2.0 * args.lora_r,
        lora_dropout=0.0,
        learning_rate=1e-5,
        tau_leader=0.05,
        tau_follower=0.05,
        report_to="none",
        log_every=10_000,
        rollout_backend=args.rollout_backend,
        vllm_max_model_len=256,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    trainer = StackelbergTrainer(
        model, None, tokenizer, CallablePreference(longer_wins), prompts, cfg
    )
    history = trainer.train()
    timed = sum(m["time_s"] for m in history[args.warmup :])
    return args.batch * args.steps / timed


def run_trl(model_dir: Path, out: Path, args: argparse.Namespace) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    ends: list[float] = []

    class StepTimes(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *_: Any, **__: Any) -> None:
            ends.append(time.perf_counter())

    total = args.warmup + args.steps
    config = RLOOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2 * args.batch,  # completions: 2 per prompt
        num_generations=2,
        max_completion_length=args.max_new_tokens,
        temperature=0.9,
        learning_rate=1e-5,
        beta=0.05,
        max_steps=total,
        logging_steps=total,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = RLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=length_reward,
        args=config,
        train_dataset=Dataset.from_dict(
            {"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]}
        ),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=lora,
        callbacks=[StepTimes()],
    )
    trainer.train()
    if len(ends) != total:
        raise RuntimeError(f"expected {total} step ends from RLOOTrainer, got {len(ends)}")
    return args.batch * args.steps / (ends[-1] - ends[args.warmup - 1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="prompts per step (both trainers)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (≥ 1)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both")
    ap.add_argument("--repeats", type=int, default=1, help="runs per trainer (order alternates)")
    ap.add_argument(
        "--rollout-backend",
        choices=["hf", "vllm"],
        default="hf",
        help="our rollouts: HF generate (as TRL's here) or the in-process vLLM engine",
    )
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "train_throughput.json"
    )
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be ≥ 1 (the timing starts at the end of a warm-up step)")

    import torch
    import transformers
    import trl

    from slhf_models.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    runs: dict[str, list[float]] = {"slhf StackelbergTrainer": [], "TRL RLOOTrainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", family="llama", seed=0)
        for r in range(args.repeats):
            order = [("slhf StackelbergTrainer", run_ours), ("TRL RLOOTrainer", run_trl)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                torch.manual_seed(0)
                runs[name].append(fn(model_dir, Path(tmp) / f"{name.split()[0]}-{r}", args))
                print(f"# {name} run {r + 1}: {runs[name][-1]:.2f} prompts/s", file=sys.stderr)
    ours = statistics.median(runs["slhf StackelbergTrainer"])
    theirs = statistics.median(runs["TRL RLOOTrainer"])
    print("| trainer | prompts/s (median) | generations/prompt |")
    print("|---|---|---|")
    print(f"| slhf StackelbergTrainer | {ours:.2f} | 2 (Leader + Follower) |")
    print(f"| TRL RLOOTrainer | {theirs:.2f} | 2 (num_generations=2) |")
    print(f"\nratio slhf / TRL = {ours / theirs:.2f} (> 1: we are faster)")
    result = {
        "benchmark": "train_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "settings": {
            "model": "slhf_models.tiny llama (2 layers, hidden 128), float32",
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "targets": "all-linear"},
            "batch_prompts": args.batch,
            "generations_per_prompt": 2,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.9,
            "kl_coefficient": 0.05,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "threads": args.threads,
            "repeats": args.repeats,
            "slhf_rollout_backend": args.rollout_backend,
        },
        "prompts_per_s": {
            "slhf": runs["slhf StackelbergTrainer"],
            "trl_rloo": runs["TRL RLOOTrainer"],
        },
        "median_prompts_per_s": {"slhf": ours, "trl_rloo": theirs},
        "ratio_slhf_over_trl": ours / theirs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, args.out)
    print(f"wrote {args.out} and its .md/.png", file=sys.stderr)
    return 0


def write_report(result: dict[str, Any], out: Path) -> None:
    """``out`` with .md (the table) and .png (a bar chart of prompts/s per run)."""
    med, runs = result["median_prompts_per_s"], result["prompts_per_s"]
    s = result["settings"]
    out.with_suffix(".md").write_text(
        f"Command: `{result['command']}`; machine: {result['machine']['platform']}, "
        f"{result['machine']['cpus']} CPUs, {s['threads']} torch thread(s). Batch "
        f"{s['batch_prompts']} prompts, {s['max_new_tokens']} new tokens, 2 generations per "
        "prompt.\n\n"
        "| trainer | prompts/s (median) | runs |\n|---|---|---|\n"
        f"| slhf StackelbergTrainer | {med['slhf']:.2f} | "
        + ", ".join(f"{x:.2f}" for x in runs["slhf"])
        + f" |\n| TRL RLOOTrainer | {med['trl_rloo']:.2f} | "
        + ", ".join(f"{x:.2f}" for x in runs["trl_rloo"])
        + f" |\n\nratio slhf / TRL = {result['ratio_slhf_over_trl']:.2f}\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(["slhf StackelbergGDA", "TRL RLOO"], [med["slhf"], med["trl_rloo"]])
    for i, xs in enumerate([runs["slhf"], runs["trl_rloo"]]):
        ax.scatter([i] * len(xs), xs, color="black", zorder=3, s=12)
    ax.set_ylabel("prompts/s")
    ax.set_title(f"training throughput (ratio {result['ratio_slhf_over_trl']:.2f})")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
