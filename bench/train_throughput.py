"""Training throughput (prompts/s): our StackelbergTrainer vs TRL's RLOOTrainer, each alone.

Two shapes (``--shape``):

- ``tiny`` (the default): the tiny Llama-family model (``slhf_models.tiny.build_tiny_model``,
  2 layers, hidden 128), LoRA r 8, batch 8, 32 new tokens, one torch thread, 6 timed steps after
  2 warm-up steps; the 32 short questions of ``PROMPTS``.
- ``qwen2.5-0.5b`` (or another ``slhf_models.shapes.SHAPES`` entry): that model's exact
  architecture and tokenizer (its real vocabulary) with random weights, built once into
  ``runs/bench/shapes/`` (the folder ``bench/train_memory.py`` uses too), float32; LoRA r 64
  (as ``bench/train_memory.py``), batch 8, 64 new tokens, torch threads = every core, 3 timed
  steps after 1 warm-up step (a step takes about 90 s on 2 cores: one warm-up step absorbs the
  first step's one-off costs, and 4 steps per trainer keep the run near 12 minutes);
  ``--batch`` prompts of about ``--prompt-tokens`` (64) tokens
  (``bench.train_memory.make_prompts``), so every step of both trainers sees the same prompts.

Both trainers get, on the same machine:
- the same model folder (float32) with the same LoRA (rank, α = 2r, all linear layers, no dropout)
  and the same learning rate;
- the same prompts (chat messages, rendered with the model's chat template), the same batch in
  *prompts* per step, the same ``max_new_tokens``, temperature and step count;
- two generations per prompt: StackelbergGDA samples a Leader answer and a Follower answer (the
  Follower's prompt holds the Leader's answer: that is the algorithm), RLOO samples
  ``num_generations=2`` completions;
- a KL term to the reference (the base model under the disabled adapter) on both sides;
- a cheap programmatic signal: RLOO's reward is the completion length, our preference is
  "the longer answer wins" (the same signal as a pairwise preference);
- the same thread count (``torch.set_num_threads``), warm-up steps excluded from the timing.

Each system alone: every run of a trainer is a child process of this script (``--child``), one
after another, never two at once; the parent only waits. Before and after each child the
benchmark records the load average (``/proc/loadavg``), lists other engines, servers and test
runs (``bench/procs.py``; ``--require-alone S`` waits up to S seconds for them to end, else
fails) and the share of the machine's CPU time that processes other than the child took while it
ran (as ``bench/train_memory.py``). "Each system alone" means none listed and that share under
10% for every run. ``--repeats`` alternates which trainer runs first.

Timing: wall time from the end of the last warm-up step to the end of the last step. Ours:
the per-step ``time_s`` the trainer logs (prompts → rollouts → preference → backward → step);
TRL: a ``TrainerCallback`` at the end of every optimiser step (TRL's logging is set to run
after the last step, so it is not timed). Generated tokens per second: ours from the per-step
means ``length/leader`` and ``length/follower`` (× batch), TRL from the per-step
``completions/mean_length`` (× 2 × batch), over the timed steps.

Run: ``.venv/bin/python bench/train_throughput.py [--repeats 2]`` (tiny, about a minute) and
``.venv/bin/python bench/train_throughput.py --shape qwen2.5-0.5b`` (about 12 minutes alone on
2 cores, estimated from ``bench/train_memory.py``'s one-step times). Writes
``bench/results/train_throughput.json`` (tiny) or ``bench/results/train_throughput_qwen0.5b.json``
(the shape; others ``train_throughput_<shape>``) with its ``.md`` and ``.png``, and prints the
Markdown table; the children's logs go to ``runs/bench/train_throughput/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
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

SYSTEMS = ("ours", "trl")
NAMES = {"ours": "slhf StackelbergTrainer", "trl": "TRL RLOOTrainer"}
KEYS = {"ours": "slhf", "trl": "trl_rloo"}  # the result's keys (as before the shape option)
TEMPERATURE = 0.9
KL_COEF = 0.05
LEARNING_RATE = 1e-5
GIB = 2**30
#: A run was alone when no engine, server or test run was seen (bench/procs.py) and other
#: processes took less than this share of the machine's CPU time while it ran.
OTHERS_SHARE_LIMIT = 0.1
#: Defaults per shape: ``tiny`` is the original benchmark (unchanged); every real shape gets
#: the realistic settings (threads None: every core).
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"max_new_tokens": 32, "steps": 6, "warmup": 2, "lora_r": 8, "threads": 1},
    "shape": {"max_new_tokens": 64, "steps": 3, "warmup": 1, "lora_r": 64, "threads": None},
}
#: Result file stems per shape (others: ``train_throughput_<shape>``).
STEMS = {"tiny": "train_throughput", "qwen2.5-0.5b": "train_throughput_qwen0.5b"}


def length_reward(completions: list[Any], **_: Any) -> list[float | None]:
    """RLOO reward: answer length in characters / 100 (conversational completions)."""
    return [len(c[0]["content"] if isinstance(c, list) else c) / 100 for c in completions]


def longer_wins(x: Any, a: str, b: str) -> float:
    """Our preference: the same signal, pairwise."""
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


# -- the child: one trainer, one run -----------------------------------------------------------
def run_ours(model_dir: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slhf_models.preferences import CallablePreference
    from slhf_models.trainer.config import StackelbergConfig
    from slhf_models.trainer.trainer import StackelbergTrainer

    t0 = time.perf_counter()
    cfg = StackelbergConfig(
        model=str(model_dir),
        dataset="bench",
        output_dir=str(out),
        batch_size=args.batch,
        max_new_tokens=args.max_new_tokens,
        temperature=TEMPERATURE,
        steps=args.warmup + args.steps,
        lora_r=args.lora_r,
        lora_alpha=2.0 * args.lora_r,
        lora_dropout=0.0,
        learning_rate=LEARNING_RATE,
        tau_leader=KL_COEF,
        tau_follower=KL_COEF,
        report_to="none",
        log_every=10_000,
        rollout_backend=args.rollout_backend,
        vllm_max_model_len=args.vllm_max_model_len,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": p}] for p in args.prompts]
    trainer = StackelbergTrainer(
        model, None, tokenizer, CallablePreference(longer_wins), prompts, cfg
    )
    setup_s = time.perf_counter() - t0
    history = trainer.train()
    step_s = [float(m["time_s"]) for m in history]
    # mean answer tokens per prompt and role; None where the trainer does not log them
    lengths = [
        sum(m[f"length/{r}"] for r in ("leader", "follower"))
        if all(f"length/{r}" in m for r in ("leader", "follower"))
        else None
        for m in history
    ]
    return {
        "setup_s": setup_s,
        "step_s": step_s,
        "generated_tokens": [None if x is None else x * args.batch for x in lengths],
    }


def run_trl(model_dir: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    ends: list[float] = []
    lengths: list[float | None] = []
    held: dict[str, Any] = {}

    class StepTimes(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *_: Any, **__: Any) -> None:
            ends.append(time.perf_counter())
            # TRL appends one completions/mean_length per generation batch (one per step here)
            # and empties the list when it logs (after the last step): read it as it grows.
            metrics = getattr(held.get("trainer"), "_metrics", {}).get("train", {})
            seen = metrics.get("completions/mean_length", [])
            lengths.append(float(seen[-1]) if len(seen) == len(ends) else None)

    t0 = time.perf_counter()
    total = args.warmup + args.steps
    config = RLOOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2 * args.batch,  # completions: 2 per prompt
        num_generations=2,
        max_completion_length=args.max_new_tokens,
        temperature=TEMPERATURE,
        learning_rate=LEARNING_RATE,
        beta=KL_COEF,
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
            {"prompt": [[{"role": "user", "content": p}] for p in args.prompts]}
        ),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=lora,
        callbacks=[StepTimes()],
    )
    held["trainer"] = trainer
    setup_s = time.perf_counter() - t0
    start = time.perf_counter()
    trainer.train()
    if len(ends) != total:
        raise RuntimeError(f"expected {total} step ends from RLOOTrainer, got {len(ends)}")
    if any(x is None for x in lengths):  # TRL's internals moved: its logged mean, every step
        logged = [
            h["completions/mean_length"]
            for h in trainer.state.log_history
            if "completions/mean_length" in h
        ]
        lengths = [logged[-1] if logged else None] * total
    step_s = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    return {
        "setup_s": setup_s,
        "step_s": step_s,
        "generated_tokens": [None if x is None else x * 2 * args.batch for x in lengths],
    }


def trainer_source() -> str:
    """A hash of our trainer's source files as this process read them (another engineer may be
    changing them while the benchmark runs)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "models" / "slhf_models" / "trainer").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def child(spec_path: Path, result_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    source = trainer_source()
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    args = argparse.Namespace(**spec)
    run = run_ours if spec["system"] == "ours" else run_trl
    with tempfile.TemporaryDirectory(prefix=f"train-throughput-{spec['system']}-") as tmp:
        out = run(Path(spec["model_dir"]), Path(tmp), args)
    timed = out["step_s"][args.warmup :]
    timed_s = sum(timed)
    tokens = out["generated_tokens"][args.warmup :]
    known = all(t is not None for t in tokens)
    result = {
        **out,
        "timed_s": timed_s,
        "prompts_per_s": args.batch * args.steps / timed_s,
        "generated_tokens_per_s": sum(tokens) / timed_s if known else None,
        "answer_tokens_mean": sum(tokens) / (2 * args.batch * len(tokens)) if known else None,
        "threads": torch.get_num_threads(),
        "trainer_source_sha256": source,
    }
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# -- the parent: the model folder, the prompts, the children, the report -------------------------
def prepare(shape: str, args: argparse.Namespace, tmp: Path) -> tuple[Path, list[str], str]:
    """The model folder, the prompts and a description of the model."""
    if shape == "tiny":
        from slhf_models.tiny import build_tiny_model

        folder = build_tiny_model(tmp / "tiny", family="llama", seed=0)
        return folder, PROMPTS, "slhf_models.tiny llama (2 layers, hidden 128), float32"
    from transformers import AutoTokenizer

    from bench.train_memory import make_prompts, rendered_lengths
    from slhf_models.shapes import SHAPES, build_shaped_model, parameter_count

    layers = SHAPES[shape].config["num_hidden_layers"]
    folder = build_shaped_model(
        args.cache / f"{shape}-{layers}l-float32-seed0", shape, num_layers=layers, seed=0
    )
    tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    prompts = make_prompts(tokenizer, args.batch, args.prompt_tokens, seed=0)
    rendered = rendered_lengths(tokenizer, prompts)
    args.prompt_tokens_rendered_mean = sum(rendered) / len(rendered)
    what = (
        f"{shape} shape ({SHAPES[shape].description}; {parameter_count(shape):,} parameters, "
        f"{layers} layers), float32, cached in {folder}"
    )
    return folder, prompts, what


def run_one(args: argparse.Namespace, spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """One child, alone; its result with the machine's load around it."""
    from bench import procs
    from bench.train_memory import cpu_seconds, run_child

    before = procs.wait_alone(args.require_alone)
    if before and args.require_alone is not None:
        raise SystemExit(f"not alone after {args.require_alone:.0f} s; stopping")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
        argv += ["--result", str(result)]
        cpu0 = cpu_seconds()
        code, samples, wall = run_child(argv, log, args.timeout)
        busy, own = (b - a for a, b in zip(cpu0, cpu_seconds(), strict=True))
        row: dict[str, Any] = {"system": spec["system"]}
        if code == 0:
            row |= json.loads(result.read_text()) | {"status": "ok"}
        else:
            row["status"] = "killed (out of memory or --timeout)" if code == -9 else f"exit {code}"
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            print(f"  {NAMES[spec['system']]}: {row['status']}; {log}:\n{tail}", file=sys.stderr)
    after = procs.others_running()
    share = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
    return row | {
        "child_wall_s": wall,
        "child_cpu_s": own,
        "machine_busy_cpu_s": busy,
        "others_cpu_share": share,
        "loadavg_before": [float(x) for x in load_before],
        "loadavg_after": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
        "rss_sampled_peak_gib": max((r for _, r in samples), default=0) / GIB,
        "others_before": before,
        "others_after": after,
        "alone": not before and not after and share < OTHERS_SHARE_LIMIT,
        "log": str(log),
    }


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r["status"] == "ok" and r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument(
        "--shape",
        default="tiny",
        help="tiny (default) or a slhf_models.shapes.SHAPES entry, e.g. qwen2.5-0.5b",
    )
    ap.add_argument("--batch", type=int, default=8, help="prompts per step (both trainers)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tiny 32, a shape 64")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (tiny 6, a shape 3)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps before them (≥ 1; tiny 2, a shape 1)",
    )
    ap.add_argument("--lora-r", type=int, default=None, help="tiny 8, a shape 64")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads for both (tiny 1, a shape: all)"
    )
    ap.add_argument("--prompt-tokens", type=int, default=64, help="a shape's prompts (about)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per trainer (order alternates)")
    ap.add_argument(
        "--rollout-backend",
        choices=["hf", "vllm"],
        default="hf",
        help="our rollouts: HF generate (as TRL's here) or the in-process vLLM engine",
    )
    ap.add_argument("--require-alone", type=float, default=None, metavar="S")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "bench" / "shapes")
    ap.add_argument("--logs", type=Path, default=REPO / "runs" / "bench" / "train_throughput")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/<stem>.json")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.result)

    from slhf_models.shapes import SHAPES

    if args.shape != "tiny" and args.shape not in SHAPES:
        ap.error(f"--shape must be tiny or one of {', '.join(SHAPES)}")
    for key, value in DEFAULTS["tiny" if args.shape == "tiny" else "shape"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.threads = args.threads or os.cpu_count() or 1
    if args.warmup < 1:
        ap.error("--warmup must be ≥ 1 (the timing starts at the end of a warm-up step)")
    if args.out is None:
        stem = STEMS.get(args.shape, f"train_throughput_{args.shape}")
        args.out = REPO / "bench" / "results" / f"{stem}.json"
    args.prompt_tokens_rendered_mean = None

    t_all = time.perf_counter()
    git_start = git_state()
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    args.logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prompts, model_what = prepare(args.shape, args, Path(tmp))
        spec = {
            "model_dir": str(model_dir),
            "prompts": prompts,
            "batch": args.batch,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "warmup": args.warmup,
            "lora_r": args.lora_r,
            "threads": args.threads,
            "rollout_backend": args.rollout_backend,
            "vllm_max_model_len": 256 if args.shape == "tiny" else 1024,
        }
        for r in range(args.repeats):
            for system in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
                print(f"{NAMES[system]} run {r + 1}:", file=sys.stderr, flush=True)
                log = args.logs / f"{STEMS.get(args.shape, args.shape)}-{system}-{r}.log"
                row = run_one(args, spec | {"system": system}, log)
                runs[system].append(row)
                print(f"  {summary_line(row)}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    ok = {s: [r for r in runs[s] if r["status"] == "ok"] for s in SYSTEMS}
    med = {KEYS[s]: median_of(runs[s], "prompts_per_s") for s in SYSTEMS}
    med_tok = {KEYS[s]: median_of(runs[s], "generated_tokens_per_s") for s in SYSTEMS}

    def ratio(m: dict[str, float | None]) -> float | None:
        return m["slhf"] / m["trl_rloo"] if m["slhf"] and m["trl_rloo"] else None

    result = {
        "benchmark": "train_throughput",
        "command": " ".join([Path(sys.executable).name, *map(shlex.quote, sys.argv)]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_start,
        "git_end": git_state(),
        "settings": {
            "shape": args.shape,
            "model": model_what,
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "targets": "all-linear"},
            "batch_prompts": args.batch,
            "prompts": len(prompts),
            "prompt_tokens_rendered_mean": args.prompt_tokens_rendered_mean,
            "generations_per_prompt": 2,
            "max_new_tokens": args.max_new_tokens,
            "temperature": TEMPERATURE,
            "kl_coefficient": KL_COEF,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "threads": args.threads,
            "repeats": args.repeats,
            "slhf_rollout_backend": args.rollout_backend,
            "each_trainer_in_its_own_process": True,
        },
        "prompts_per_s": {KEYS[s]: [r["prompts_per_s"] for r in ok[s]] for s in SYSTEMS},
        "median_prompts_per_s": med,
        "ratio_slhf_over_trl": ratio(med),
        "generated_tokens_per_s": {
            KEYS[s]: [r["generated_tokens_per_s"] for r in ok[s]] for s in SYSTEMS
        },
        "median_generated_tokens_per_s": med_tok,
        "ratio_tokens_slhf_over_trl": ratio(med_tok),
        "each_system_alone": all(r["alone"] for s in SYSTEMS for r in runs[s]),
        "runs": runs,
        "total_s": total,
    }
    md = report(result)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    if all(ok.values()):
        plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and its .md/.png", file=sys.stderr)
    return 0 if all(len(ok[s]) == len(runs[s]) for s in SYSTEMS) else 1


def summary_line(row: dict[str, Any]) -> str:
    load = f"load {row['loadavg_before'][0]:.2f} → {row['loadavg_after'][0]:.2f}"
    share = f"others' CPU {row['others_cpu_share']:.0%}"
    if row["status"] != "ok":
        return f"{row['status']}; {share}, {load}"
    return (
        f"{fmt(row['prompts_per_s'], '.3g')} prompts/s, "
        f"{fmt(row['generated_tokens_per_s'], '.3g')} generated tokens/s "
        f"(timed {row['timed_s']:.1f} s, child {row['child_wall_s']:.0f} s); {share}, {load}"
    )


def fmt(x: float | None, spec: str = ".2f") -> str:
    """``x`` formatted (``?`` for None); spec ``.3g`` keeps 3 digits without an exponent."""
    if x is None:
        return "?"
    if spec == ".3g":
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:#.3g}"
    return format(x, spec)


def report(result: dict[str, Any]) -> str:
    s, m, g = result["settings"], result["machine"], result["git"]
    rendered = s["prompt_tokens_rendered_mean"]
    prompts = f"{s['prompts']} prompts" + (
        "" if rendered is None else f" of {rendered:.0f} tokens with the chat template"
    )
    sources = {r.get("trainer_source_sha256") for r in result["runs"]["ours"]}
    notes = [f"trainer files modified: {', '.join(g['trainer_modified'])}"]
    notes = notes if g["trainer_modified"] else []
    if len(sources - {None}) > 1:
        notes.append("OUR TRAINER CHANGED BETWEEN ITS RUNS (see trainer_source_sha256)")
    modified = f" ({'; '.join(notes)})" if notes else ""
    alone = (
        "yes"
        if result["each_system_alone"]
        else (
            "NO (others' CPU: the share of the machine's CPU time other processes took while the "
            "trainer's process ran; the JSON's others_before/after list engines, servers and tests)"
        )
    )
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; machine: {m['platform']}, {m['cpus']} CPUs, "
        f"{m['memory_gib']:.0f} GiB; torch {m['torch']}, transformers {m['transformers']}, "
        f"trl {m['trl']}, peft {m['peft']}; commit {g['commit']}{modified}.  ",
        f"Model: {s['model']}. LoRA r = {s['lora']['r']}, α = {s['lora']['alpha']}, all linear "
        f"layers; batch {s['batch_prompts']} prompts per step ({prompts}), 2 answers of up to "
        f"{s['max_new_tokens']} new tokens per prompt; KL coefficient {s['kl_coefficient']}; "
        f"{s['threads']} torch thread(s); {s['timed_steps']} timed steps after "
        f"{s['warmup_steps']} warm-up steps; each trainer in its own process, one at a time.  ",
        f"Each system alone: {alone}; the whole run took {result['total_s'] / 60:.1f} min.",
        "",
        "| trainer | run | prompts/s | generated tokens/s | answer tokens (mean) | timed s | "
        "others' CPU | load avg before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, rows in result["runs"].items():
        for i, r in enumerate(rows):
            load = f"{r['loadavg_before'][0]:.2f} → {r['loadavg_after'][0]:.2f}"
            if r["status"] != "ok":
                lines.append(
                    f"| {NAMES[system]} | {i + 1} | {r['status']} | | | | "
                    f"{r['others_cpu_share']:.0%} | {load} |"
                )
                continue
            lines.append(
                f"| {NAMES[system]} | {i + 1} | {fmt(r['prompts_per_s'], '.3g')} | "
                f"{fmt(r['generated_tokens_per_s'], '.3g')} | {fmt(r['answer_tokens_mean'], '.1f')}"
                f" | {r['timed_s']:.1f} | {r['others_cpu_share']:.0%} | {load} |"
            )
    med, tok = result["median_prompts_per_s"], result["median_generated_tokens_per_s"]
    lines += [
        "",
        "| trainer | prompts/s (median) | generated tokens/s (median) | generations/prompt |",
        "|---|---|---|---|",
        f"| {NAMES['ours']} | {fmt(med['slhf'], '.3g')} | {fmt(tok['slhf'], '.3g')} | "
        "2 (Leader + Follower) |",
        f"| {NAMES['trl']} | {fmt(med['trl_rloo'], '.3g')} | {fmt(tok['trl_rloo'], '.3g')} | "
        "2 (num_generations=2) |",
        "",
        f"ratio slhf / TRL: prompts/s {fmt(result['ratio_slhf_over_trl'])}, generated tokens/s "
        f"{fmt(result['ratio_tokens_slhf_over_trl'])} (> 1: we are faster)",
        "",
        "Others' CPU: other processes' share of the machine's CPU time while the trainer's "
        f"process ran (setup included); above {OTHERS_SHARE_LIMIT:.0%} its throughput is slowed "
        "by them. Load average: the 1-minute figure of /proc/loadavg just before and after the "
        "trainer's process (before the second one it still holds the first one's load). "
        "Generated tokens: answer tokens sampled in the timed steps (ours: length/leader + "
        "length/follower × batch; TRL: completions/mean_length × 2 × batch).",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """A bar chart of prompts/s per trainer (median), a dot per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med, runs = result["median_prompts_per_s"], result["prompts_per_s"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(["slhf StackelbergGDA", "TRL RLOO"], [med["slhf"], med["trl_rloo"]])
    for i, xs in enumerate([runs["slhf"], runs["trl_rloo"]]):
        ax.scatter([i] * len(xs), xs, color="black", zorder=3, s=12)
    ax.set_ylabel("prompts/s")
    shape = result["settings"]["shape"]
    ax.set_title(f"training throughput, {shape} (ratio {result['ratio_slhf_over_trl']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import psutil

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / GIB,
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate")},
    }


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout

    modified = git("status", "--porcelain", "--", "models/slhf_models/trainer").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "trainer_modified": [x[3:] for x in modified],  # "XY path": not stripped
    }


if __name__ == "__main__":
    sys.exit(main())
