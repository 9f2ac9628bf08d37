"""Peak memory of one training step: our StackelbergTrainer vs TRL's RLOOTrainer and GRPOTrainer.

Every (system, mode) runs alone in its own child process, one after another, on the same model
folder (``slhf_models.shapes``: by default Qwen2.5-0.5B's exact architecture and tokenizer with
random weights, built once into ``runs/bench/shapes/``), the same dtype, the same prompts (batch
``--batch-size`` prompts of about ``--prompt-tokens`` tokens each, chat messages rendered with the
model's chat template), the same answer length and the same seed:

- ``ours``: ``StackelbergTrainer``; one step = a Leader answer and a Follower answer per prompt
  (2 × batch answers scored), the preference "the longer answer wins", τL = τF = 0.04. The
  Follower's prompt also holds the Leader's answer and the Follower instruction, so ours scores
  longer sequences than TRL does (that is the algorithm).
- ``rloo`` / ``grpo``: TRL's ``RLOOTrainer`` / ``GRPOTrainer`` with ``num_generations=2`` (2 ×
  batch completions), ``max_completion_length`` = our ``max_new_tokens``, ``beta=0.04`` so that a
  reference is scored as in ours, a length reward, no vLLM, one step, ``report_to none``, no
  autocast (``bf16=False``: the weights' dtype is the compute dtype on both sides).

Modes: ``lora`` (r = ``--lora-r``, α = 2r, every linear layer, no dropout; the reference is the
base under the disabled adapter on both sides) and ``full`` (every weight trains with AdamW; the
reference is a second copy of the model: we load it and pass it in, TRL loads it itself).
Gradient checkpointing is off unless ``--gradient-checkpointing`` (on both sides; TRL's own
default is on). Each child loads the models itself (``from_pretrained(folder, dtype=...)``) and
records whether checkpointing ended up active.

Memory, on CPU: resident set sizes. ``loaded`` is the RSS once the trainer is built (models,
reference, adapters, optimiser without state) and every weight was read once
(``from_pretrained`` maps the safetensors file: unread weights are not resident yet), before
the step. ``step peak`` is the kernel's resident high-water mark (``VmHWM``, what
``getrusage(RUSAGE_SELF).ru_maxrss`` reports for a process that did not ``exec``) read when the
step ends, after it was reset (``/proc/self/clear_refs``) at the step's start: the step's own
peak. ``setup peak`` is the mark before that reset (loading can peak higher than it settles).
``ru_maxrss`` itself is recorded too but is not the figure: after ``exec`` it starts at the
parent's peak, which is why the model folder is built in a child of its own and the parent
never loads torch. On CUDA: ``torch.cuda.memory_allocated`` after setup and
``max_memory_allocated`` over the step. Also the step's wall time and the answer tokens it
generated per second. Ours' step ends where ``train()`` would write its final checkpoint (not
written: TRL's run saves none either), TRL's at its ``on_step_end`` callback; both start before
the first rollout.

Before and after each child the benchmark lists other engines, servers and test runs
(``bench/procs.py``; ``--require-alone S`` waits up to S seconds for them to end, else fails),
and it records the share of the machine's CPU time that processes other than the child took
while it ran (a training run of another kind is no engine, server or test, yet it slows the step;
memory is per process and unaffected). "Each system alone" needs none listed and that share
under 10% for every system.

Run: ``.venv/bin/python bench/train_memory.py`` (defaults: qwen2.5-0.5b, batch 8, 64 new
tokens, 64-token prompts, lora and full, ours/rloo/grpo; float32 on CPU, bfloat16 on a CUDA GPU
with bf16). On 2 CPU cores: about 15 minutes, alone. Writes ``bench/results/train_memory.json`` and
``.md``; the children's logs go to ``runs/bench/train_memory/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYSTEMS = ("ours", "rloo", "grpo")
MODES = ("lora", "full")
NAMES = {
    "ours": "slhf StackelbergTrainer",
    "rloo": "TRL RLOOTrainer",
    "grpo": "TRL GRPOTrainer",
}
KL_COEF = 0.04
TEMPERATURE = 0.9
LEARNING_RATE = 1e-5
GIB = 2**30
#: A system ran alone when no engine, server or test run was seen (bench/procs.py) and other
#: processes took less than this share of the machine's CPU time while it ran.
OTHERS_SHARE_LIMIT = 0.1
#: Prompts are drawn from this passage's words.
PASSAGE = (
    "Explain why the river map changes after the winter rain, and describe how people in the "
    "city compare the old stone bridge with the new one. Which questions should a careful "
    "reader ask about the history of the market, the weather in the mountain garden, the "
    "language of a letter found near the window, and the number of machines in the school?"
)
WORDS = PASSAGE.replace(",", "").replace(".", "").replace("?", "").split()


# -- the child: one system, one mode ---------------------------------------------------------
def make_prompts(tokenizer: Any, n: int, tokens: int, seed: int) -> list[str]:
    """``n`` distinct requests of about ``tokens`` tokens each (seeded word salad, cut at
    ``tokens`` ids and decoded)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(2 * tokens)]
        text = f"Request {i}: " + " ".join(words)
        ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
        prompts.append(tokenizer.decode(ids).strip())
    return prompts


def rendered_lengths(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Each prompt's length in tokens once the chat template has rendered it as a user turn."""
    return [
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for p in prompts
    ]


def rss() -> int:
    """This process's resident set, bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's resident high-water mark (``VmHWM``), bytes.

    Not ``ru_maxrss``: after ``exec`` that starts at the parent's peak at the time of the fork
    (Linux folds the old address space's high-water mark into it), and resetting the mark does
    not lower it. Without ``/proc``, ``ru_maxrss`` it is."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return ru_maxrss()


def ru_maxrss() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark to the current RSS (``/proc/self/clear_refs``:
    ``5``); False where that is not possible (then the step's peak includes the setup's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def make_resident(*models: Any) -> None:
    """Read every weight once. ``from_pretrained`` maps a safetensors file whose dtype it keeps
    without reading it (file-backed pages, resident only once touched), so without this the
    ``loaded`` RSS would leave out weights the step reads anyway."""
    import torch

    with torch.no_grad():
        for model in models:
            if model is not None:
                for tensor in [*model.parameters(), *model.buffers()]:
                    tensor.sum()


def device_memory(torch: Any) -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def build_ours(args: argparse.Namespace, prompts: list[str], out: Path) -> tuple[Any, Any]:
    """The trainer and a function running its one step; returns ``(trainer, step)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slhf_models.preferences import CallablePreference
    from slhf_models.trainer.config import StackelbergConfig
    from slhf_models.trainer.trainer import StackelbergTrainer

    dtype = getattr(torch, args.dtype)
    lora = args.mode == "lora"
    cfg = StackelbergConfig(
        model=str(args.model_dir),
        dataset="bench",
        output_dir=str(out),
        use_lora=lora,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=TEMPERATURE,
        steps=1,
        seed=args.seed,
        lora_r=args.lora_r,
        lora_alpha=2.0 * args.lora_r,
        lora_dropout=0.0,
        learning_rate=LEARNING_RATE,
        tau_leader=KL_COEF,
        tau_follower=KL_COEF,
        report_to="none",
        log_every=10_000,
    )

    def longer_wins(x: Any, a: str, b: str) -> float:
        return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5

    load = AutoModelForCausalLM.from_pretrained
    model = load(args.model_dir, dtype=dtype)
    ref = None if lora else load(args.model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    trainer = StackelbergTrainer(model, ref, tokenizer, CallablePreference(longer_wins), chats, cfg)
    end: dict[str, Any] = {}

    def at_step_end(step: int) -> None:  # replaces the final checkpoint: the step ends here
        end.update(t=time.perf_counter(), peak=peak_rss(), device=device_memory(torch))

    trainer.save_checkpoint = at_step_end

    def step() -> dict[str, Any]:
        t0 = time.perf_counter()
        history = trainer.train()
        metrics = history[0]
        answers = sum(metrics.get(f"length/{r}", 0.0) for r in ("leader", "follower"))
        return {
            "end": end,
            "start": t0,
            "answer_tokens": answers * args.batch_size,
            "trainer_time_s": metrics.get("time_s"),
        }

    return trainer, step


def build_trl(args: argparse.Namespace, prompts: list[str], out: Path) -> tuple[Any, Any]:
    """TRL's RLOO or GRPO trainer and a function running its one step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if args.system == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

    end: dict[str, Any] = {}

    class StepEnd(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            end["begin"] = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            end.update(t=time.perf_counter(), peak=peak_rss(), device=device_memory(torch))

    def length_reward(completions: list[Any], **_: Any) -> list[float]:
        return [len(c[0]["content"] if isinstance(c, list) else c) / 100 for c in completions]

    config = Config(
        output_dir=str(out),
        per_device_train_batch_size=2 * args.batch_size,  # completions: 2 per prompt
        num_generations=2,
        max_completion_length=args.max_new_tokens,
        temperature=TEMPERATURE,
        learning_rate=LEARNING_RATE,
        beta=KL_COEF,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        disable_dropout=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = None
    if args.mode == "lora":
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=getattr(torch, args.dtype)
        ),
        reward_funcs=length_reward,
        args=config,
        train_dataset=Dataset.from_dict(
            {"prompt": [[{"role": "user", "content": p}] for p in prompts]}
        ),
        processing_class=AutoTokenizer.from_pretrained(args.model_dir),
        peft_config=peft_config,
        callbacks=[StepEnd()],
    )

    def step() -> dict[str, Any]:
        t0 = time.perf_counter()
        trainer.train()
        logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
        mean_length = logs[0]["completions/mean_length"] if logs else None
        return {
            "end": end,
            "start": end.get("begin", t0),
            "answer_tokens": None if mean_length is None else mean_length * 2 * args.batch_size,
            "trainer_time_s": None,
        }

    return trainer, step


def checkpointing_active(trainer: Any) -> bool:
    model = getattr(trainer, "policy", None) or trainer.model
    while hasattr(model, "get_base_model") or hasattr(model, "module"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return bool(getattr(model, "is_gradient_checkpointing", False))


def optimizer_info(optimizer: Any) -> dict[str, Any]:
    """The optimiser's class and how its update runs (fused / foreach / per tensor)."""
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    defaults = getattr(optimizer, "defaults", {})
    return {
        "class": type(optimizer).__name__,
        "fused": defaults.get("fused"),
        "foreach": defaults.get("foreach"),
    }


def trainer_source() -> str:
    """A hash of our trainer's source files as this process read them (the trainer may change
    while the benchmark runs)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((REPO / "models" / "slhf_models" / "trainer").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def child(args: argparse.Namespace) -> int:
    source = trainer_source()
    import torch
    from transformers import AutoTokenizer

    rss_imports = rss()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = make_prompts(tokenizer, args.batch_size, args.prompt_tokens, args.seed)
    rendered = rendered_lengths(tokenizer, prompts)
    torch.manual_seed(args.seed)
    build = build_ours if args.system == "ours" else build_trl
    with tempfile.TemporaryDirectory(prefix=f"train-memory-{args.system}-") as tmp:
        t0 = time.perf_counter()
        trainer, step = build(args, prompts, Path(tmp))
        make_resident(trainer.model, getattr(trainer, "ref_model", None))
        setup_s = time.perf_counter() - t0
        loaded, setup_peak = rss(), peak_rss()
        device_loaded = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            device_loaded = torch.cuda.memory_allocated()
        was_reset = reset_peak_rss()
        out = step()
    end = out["end"]
    if "t" not in end:
        raise RuntimeError(f"{args.system}: the step's end was never reached")
    step_s = end["t"] - out["start"]
    result = {
        "system": args.system,
        "mode": args.mode,
        "rss_after_imports": rss_imports,
        "rss_loaded": loaded,
        "rss_setup_peak": setup_peak,
        "rss_step_peak": end["peak"],
        "ru_maxrss_at_exit": ru_maxrss(),
        "peak_reset_at_step_start": was_reset,
        "device_loaded": device_loaded,
        "device_step_peak": end["device"][1] if end["device"] else None,
        "setup_s": setup_s,
        "step_s": step_s,
        "step_start_clock": out["start"],  # time.perf_counter(): the parent's clock too
        "step_end_clock": end["t"],
        "trainer_time_s": out["trainer_time_s"],
        "answer_tokens": out["answer_tokens"],
        "answer_tokens_per_s": (
            None if out["answer_tokens"] is None else out["answer_tokens"] / step_s
        ),
        "prompt_tokens_rendered_mean": sum(rendered) / len(rendered),
        "gradient_checkpointing_active": checkpointing_active(trainer),
        "optimizer": optimizer_info(trainer.optimizer),
        "threads": torch.get_num_threads(),
        "trainer_source_sha256": source,
    }
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def prepare(args: argparse.Namespace) -> int:
    """The model folder (built once into ``--cache``), the dtype ``auto`` resolves to and the
    device, as JSON in ``--result``: run in a child so the parent stays small (a child's
    ``ru_maxrss`` starts at its parent's peak)."""
    import torch

    from slhf_models.shapes import SHAPES, build_shaped_model, parameter_count

    cuda = torch.cuda.is_available()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    layers = args.num_layers or SHAPES[args.shape].config["num_hidden_layers"]
    t0 = time.perf_counter()
    folder = args.cache / f"{args.shape}-{layers}l-{dtype}-seed{args.seed}"
    model_dir = build_shaped_model(
        folder, args.shape, num_layers=layers, dtype=dtype, seed=args.seed
    )
    info = {
        "model_dir": str(model_dir),
        "dtype": dtype,
        "num_layers": layers,
        "parameters": parameter_count(args.shape, num_layers=layers),
        "ready_s": time.perf_counter() - t0,
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }
    Path(args.result).write_text(json.dumps(info) + "\n")
    return 0


# -- the parent: build the model, run the children, report ---------------------------------------
def child_argv(args: argparse.Namespace, system: str, mode: str, result: Path) -> list[str]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        system,
        "--mode",
        mode,
        "--model-dir",
        str(args.model_dir),
        "--result",
        str(result),
        "--dtype",
        args.dtype,
        "--batch-size",
        str(args.batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--lora-r",
        str(args.lora_r),
        "--seed",
        str(args.seed),
    ]
    return argv + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def cpu_seconds() -> tuple[float, float]:
    """The machine's busy CPU seconds and those of this process's finished children."""
    import resource

    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, kids.ru_utime + kids.ru_stime


def run_child(
    argv: list[str], log: Path, timeout: float
) -> tuple[int, list[tuple[float, int]], float]:
    """Run one child, its output into ``log``; sample its RSS every 0.2 s (a killed child reports
    nothing else). Returns ``(exit code, [(time.perf_counter(), RSS)], wall seconds)``; past
    ``timeout`` the child is killed."""
    import psutil

    t0, samples = time.perf_counter(), []
    with log.open("w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                samples.append((time.perf_counter(), watched.memory_info().rss))
            if time.perf_counter() - t0 > timeout:
                proc.kill()
            time.sleep(0.2)
    return proc.returncode, samples, time.perf_counter() - t0


#: The step's RSS is kept as at most this many points (the highest sample in each).
TIMELINE_POINTS = 40


def timeline(samples: list[tuple[float, int]], start: float, end: float) -> dict[str, Any]:
    """The sampled RSS during the step: its highest sample's time as a share of the step, and the
    highest RSS (GiB) in each of ``TIMELINE_POINTS`` equal slices of the step."""
    during = [((t - start) / (end - start), r) for t, r in samples if start <= t <= end]
    if not during:
        return {"peak_at_share": None, "rss_gib_by_slice": []}
    at, _ = max(during, key=lambda x: x[1])
    slices = [0] * TIMELINE_POINTS
    for share, r in during:
        i = min(int(share * TIMELINE_POINTS), TIMELINE_POINTS - 1)
        slices[i] = max(slices[i], r)
    return {
        "peak_at_share": round(at, 3),
        "rss_gib_by_slice": [round(r / GIB, 2) if r else None for r in slices],
    }


def run_children(args: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    """Every (mode, system) in its own child, one after another; a child that fails (killed for
    memory, say) gives a row with its ``status`` and the run goes on."""
    import psutil

    from bench import procs

    rows: list[dict[str, Any]] = []
    alone = True
    args.logs.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        for system in args.systems:
            print(f"{system} / {mode}:", file=sys.stderr, flush=True)
            before = procs.wait_alone(args.require_alone)
            if before and args.require_alone is not None:
                raise SystemExit(
                    f"not alone after {args.require_alone:.0f} s; stopping before {system}"
                )
            available = psutil.virtual_memory().available
            log = args.logs / f"{system}-{mode}.log"
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "result.json"
                cpu0 = cpu_seconds()
                argv = child_argv(args, system, mode, result)
                code, samples, wall = run_child(argv, log, args.timeout)
                sampled = max((r for _, r in samples), default=0)
                busy, own = (b - a for a, b in zip(cpu0, cpu_seconds(), strict=True))
                row: dict[str, Any] = {"system": system, "mode": mode}
                if code == 0:
                    row |= json.loads(result.read_text()) | {"status": "ok"}
                    row["step_rss"] = timeline(
                        samples, row["step_start_clock"], row["step_end_clock"]
                    )
                else:
                    why = "killed (SIGKILL: out of memory or --timeout)" if code == -9 else ""
                    row["status"] = why or f"exit {code}"
                    tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
                    print(f"  {system} / {mode}: {row['status']}; {log}:\n{tail}", file=sys.stderr)
            after = procs.others_running()
            if after:
                print(
                    f"WARNING: other processes appeared during {system} / {mode}: {after}",
                    file=sys.stderr,
                )
            others_share = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
            alone = alone and not before and not after and others_share < OTHERS_SHARE_LIMIT
            row |= {
                "child_wall_s": wall,
                "rss_sampled_peak": sampled,
                "memory_available_before": available,
                "machine_busy_cpu_s": busy,
                "child_cpu_s": own,
                "others_cpu_share": others_share,
                "load_average_after": os.getloadavg(),
                "others_before": before,
                "others_after": after,
                "log": str(log),
            }
            rows.append(row)
            print(f"  {summary_line(row)}", file=sys.stderr, flush=True)
    return rows, alone


def peak(row: dict[str, Any]) -> float:
    """The step's peak in bytes: device memory on CUDA, else the RSS."""
    return float(
        row["device_step_peak"] if row["device_step_peak"] is not None else row["rss_step_peak"]
    )


def loaded(row: dict[str, Any]) -> float:
    return float(row["device_loaded"] if row["device_loaded"] is not None else row["rss_loaded"])


def summary_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}; highest RSS sampled {row['rss_sampled_peak'] / GIB:.2f} GiB"
    return (
        f"loaded {loaded(row) / GIB:.2f} GiB, step peak {peak(row) / GIB:.2f} GiB "
        f"(+{(peak(row) - loaded(row)) / GIB:.2f}), step {row['step_s']:.1f} s"
    )


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours / peer for each mode and peer: step peak, step peak − loaded, step time."""
    by = {(r["system"], r["mode"]): r for r in rows if r["status"] == "ok"}
    out = []
    for (_, mode), ours in ((k, v) for k, v in by.items() if k[0] == "ours"):
        for peer in ("rloo", "grpo"):
            theirs = by.get((peer, mode))
            if theirs is None:
                continue
            d_ours, d_theirs = peak(ours) - loaded(ours), peak(theirs) - loaded(theirs)
            out.append(
                {
                    "mode": mode,
                    "peer": peer,
                    "step_peak": peak(ours) / peak(theirs),
                    "step_peak_minus_loaded": d_ours / d_theirs if d_theirs > 0 else None,
                    "step_time": ours["step_s"] / theirs["step_s"],
                }
            )
    return out


def tables(result: dict[str, Any]) -> str:
    s = result["settings"]
    unit = "GPU memory (allocated)" if result["machine"]["cuda"] else "RSS"
    lines = [
        f"| system | mode | loaded {unit} | step peak | peak − loaded | setup peak RSS | step s | "
        "answer tok/s | checkpointing | others' CPU | peak at |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(
                f"| {NAMES[r['system']]} | {r['mode']} | {r['status']}: highest RSS sampled "
                f"{r['rss_sampled_peak'] / GIB:.2f} GiB, "
                f"{r['memory_available_before'] / GIB:.1f} GiB available at its start | | | | | | "
                f"{r['others_cpu_share']:.0%} | |"
            )
            continue
        gib = (
            f"{loaded(r) / GIB:.2f} GiB | {peak(r) / GIB:.2f} GiB | "
            f"{(peak(r) - loaded(r)) / GIB:.2f} GiB | {r['rss_setup_peak'] / GIB:.2f} GiB"
        )
        tps = f"{r['answer_tokens_per_s']:.1f}" if r["answer_tokens_per_s"] else "?"
        share = r["step_rss"]["peak_at_share"]
        at = "?" if share is None else f"{share:.0%} of the step"
        lines.append(
            f"| {NAMES[r['system']]} | {r['mode']} | {gib} | {r['step_s']:.1f} | {tps} | "
            f"{'on' if r['gradient_checkpointing_active'] else 'off'} | "
            f"{r['others_cpu_share']:.0%} | {at} |"
        )
    lines += [
        "",
        "| mode | ours / peer | step peak | peak − loaded | step time |",
        "|---|---|---|---|---|",
    ]
    for q in result["ratios"]:
        minus = f"{q['step_peak_minus_loaded']:.2f}" if q["step_peak_minus_loaded"] else "?"
        lines.append(
            f"| {q['mode']} | ours / {q['peer']} | {q['step_peak']:.2f} | {minus} | "
            f"{q['step_time']:.2f} |"
        )
    m, v, g = result["machine"], result["versions"], result["git"]
    rendered = s["prompt_tokens_rendered_mean"]
    rendered = "?" if rendered is None else f"{rendered:.0f}"
    gpu = f", {m['gpu']}" if m["gpu"] else ""
    sources = {r["trainer_source_sha256"] for r in result["rows"] if r["status"] == "ok"}
    notes_git = [f"trainer files modified: {', '.join(g['trainer_modified'])}"]
    notes_git = notes_git if g["trainer_modified"] else []
    if len(sources) > 1:  # each child hashed the trainer's files as it read them
        notes_git.append("THE TRAINER CHANGED DURING THE RUN (see trainer_source_sha256)")
    modified = f" ({'; '.join(notes_git)})" if notes_git else ""
    alone = (
        "yes"
        if result["each_system_alone"]
        else "NO (others' CPU: the share of the machine's CPU time other processes took while "
        "the system ran; the JSON's others_before/after list engines, servers and test runs)"
    )
    head = (
        f"Command: `{result['command']}`  \n"
        f"Date: {result['date']}; machine: {m['platform']}, {m['cpus']} CPUs, "
        f"{m['memory_gib']:.0f} GiB{gpu}; torch {v['torch']}, transformers "
        f"{v['transformers']}, trl {v['trl']}, peft {v['peft']}; commit {g['commit']}"
        f"{modified}.  \n"
        f"Model: {s['shape']} ({s['parameters']:,} parameters, {s['num_layers']} layers), "
        f"{s['dtype']}; batch {s['batch_size']} prompts of ~{s['prompt_tokens']} tokens "
        f"({rendered} with the chat template), 2 answers of up to "
        f"{s['max_new_tokens']} tokens per prompt, LoRA r = {s['lora_r']}, α = {2 * s['lora_r']}; "
        f"KL coefficient {KL_COEF}; gradient checkpointing requested: "
        f"{'on' if s['gradient_checkpointing'] else 'off'}.  \n"
        f"Each system alone: {alone}; the whole run took {result['total_s'] / 60:.1f} min.\n"
    )
    optimisers = sorted(
        {
            f"{NAMES[r['system']]}: {r['optimizer']['class']}"
            + (" (fused)" if r["optimizer"]["fused"] else "")
            for r in result["rows"]
            if r["status"] == "ok"
        }
    )
    notes = [
        "",
        "Peak: the step's own high-water mark (on CPU the RSS's, on a GPU "
        "max_memory_allocated); loaded: after setup with every weight read once. Peak at: when "
        "the RSS sampled every 0.2 s by the parent was highest, as a share of the step. Others' "
        f"CPU: other processes' share of the machine's CPU time while the system ran; above "
        f"{OTHERS_SHARE_LIMIT:.0%} its step time is slowed by them (memory is not).",
        "Optimisers: " + "; ".join(optimisers) + ".",
    ]
    return head + "\n" + "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b", help="slhf_models.shapes.SHAPES")
    ap.add_argument("--num-layers", type=int, default=None, help="default: the real model's")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="tokens per request (about)")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 on a CUDA GPU with bf16, else float32",
    )
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--require-alone", type=float, default=None, metavar="S")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per child")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "bench" / "shapes")
    ap.add_argument("--logs", type=Path, default=REPO / "runs" / "bench" / "train_memory")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_memory.json")
    # the child's own arguments
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.system = args.child
        return child(args)
    if args.prepare:
        return prepare(args)

    from slhf_models.shapes import SHAPES  # no torch in this process (see prepare)

    git_start = git_state()
    if args.shape not in SHAPES:
        ap.error(f"--shape must be one of {', '.join(SHAPES)}")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        info_path = Path(tmp) / "prepare.json"
        argv_prepare = [sys.executable, str(Path(__file__).resolve()), "--prepare"]
        argv_prepare += [a for a in (sys.argv[1:] if argv is None else argv) if a != "--prepare"]
        argv_prepare += ["--result", str(info_path)]
        subprocess.run(argv_prepare, check=True, cwd=REPO)
        info = json.loads(info_path.read_text())
    args.model_dir, args.dtype = Path(info["model_dir"]), info["dtype"]
    print(f"model folder {args.model_dir} ready in {info['ready_s']:.0f} s", file=sys.stderr)
    rows, alone = run_children(args)
    total = time.perf_counter() - t_all
    result = {
        "benchmark": "train_memory",
        "command": " ".join([Path(sys.executable).name, *map(shlex.quote, sys.argv)]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(info),
        "versions": versions(),
        "git": git_start,
        "git_end": git_state(),
        "settings": {
            "shape": args.shape,
            "num_layers": info["num_layers"],
            "parameters": info["parameters"],
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "answers_per_prompt": 2,
            "max_new_tokens": args.max_new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "prompt_tokens_rendered_mean": next(
                (r["prompt_tokens_rendered_mean"] for r in rows if r["status"] == "ok"), None
            ),
            "lora_r": args.lora_r,
            "lora_alpha": 2 * args.lora_r,
            "kl_coefficient": KL_COEF,
            "temperature": TEMPERATURE,
            "gradient_checkpointing": args.gradient_checkpointing,
            "seed": args.seed,
            "model_dir": str(args.model_dir),
        },
        "each_system_alone": alone,
        "rows": rows,
        "ratios": ratios(rows),
        "total_s": total,
    }
    md = tables(result)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(f"wrote {args.out} and its .md", file=sys.stderr)
    return 0


def machine(info: dict[str, Any]) -> dict[str, Any]:
    import psutil

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / GIB,
        "python": platform.python_version(),
        "cuda": info["cuda"],
        "gpu": info["gpu"],
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("torch", "transformers", "trl", "peft", "accelerate", "tokenizers")
    return {name: version(name) for name in names}


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    status = subprocess.run(
        ["git", "status", "--porcelain", "--", "models/slhf_models/trainer"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    modified = status.stdout.splitlines()  # "XY path": not stripped
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "trainer_modified": [m[3:] for m in modified],
    }


if __name__ == "__main__":
    sys.exit(main())
