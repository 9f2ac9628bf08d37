"""Build the shipped demo model end to end (docs/demo.md): ``make demo-model``.

One seeded command, on CPU, from nothing but this repository::

    python -m slhf_models.demo runs/demo --ship models/slhf_models/weights/slhf-condorcet-tiny

1. two tiny models of two families (``slhf_models.tiny``, size "demo": llama, seed 0; qwen2,
   seed 1), the project's tokenizer and ChatML template;
2. the Condorcet task's demonstrations (``slhf_models.tasks.condorcet``: three styles in equal
   shares, half of them with defects; half of the rows in the Follower template, rewriting the
   given answer in a random style with its defects) and train / held-out prompts;
3. a supervised warm start of each family (``slhf_models.sft``): family 1 is the base and reference
   of the SLHF run, family 2 the "other model family" of the evaluation;
4. StackelbergGDA on family 1 with ``recipes/demo.yaml`` (``slhf train``: one model, both roles);
5. the final weights in bfloat16 with their tokenizer and an ``slhf.json`` that records how they
   were made (recipe, seeds, timings), written to ``--ship``.

Everything lands in ``OUT_DIR`` (checkpoints every ``save_every`` steps; ``--resume`` continues
an interrupted run from its last checkpoint). The evaluation of the shipped model is a separate
command (``make demo-eval``, i.e. ``slhf eval``), since it needs the vLLM server. See
docs/demo.md for the task, the recipe and what the model does.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slhf_models.serving.manifest import Manifest, SamplingDefaults
from slhf_models.sft import SFTConfig

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo.yaml"
TASK = "condorcet"
#: ``slhf_models.tiny`` size of both families: three layers of four heads copy the prompt's
#: subject, which the two-layer "tiny" got wrong in a quarter of its answers (docs/demo.md).
SIZE = "demo"
SHIPPED_NAME = "slhf-condorcet-tiny"

DEMOS, FOLLOWER_SHARE, TRAIN_PROMPTS, EVAL_PROMPTS = 8000, 0.5, 4000, 128
#: Follower-template rows are ~100-140 tokens (prompt, given answer, instruction, answer).
SFT = SFTConfig(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=20, max_length=192)
#: family -> (seed, warm-start steps); family 2 is the evaluation's "other family".
FAMILIES = {"llama": (0, SFT.steps), "qwen2": (1, SFT.steps)}
#: The shipped model's serving defaults: the task's answers are 25-40 tokens; 64 leave room.
SAMPLING = SamplingDefaults(max_tokens=64, temperature=0.9, top_k=50)
#: torch threads for the build. On the shared 2-core machine one thread ran an SFT step in
#: 1.5 s and two threads in 4.5 s (OpenMP workers wait on each other when a core is taken).
THREADS = 1


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Print the stage's start and end; record its wall time in ``timings``."""
    print(f"== {name}", flush=True)
    t0 = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - t0, 1)
    print(f"== {name}: {timings[name]} s", flush=True)


def build_data(out: Path) -> dict[str, Path]:
    from slhf_models.tasks import task_module
    from slhf_models.tasks.arith import write_jsonl

    task = task_module(TASK)
    rows = task.demonstrations(DEMOS, seed=0, follower_share=FOLLOWER_SHARE)
    paths = {
        "demos": write_jsonl(rows, out / "demos.jsonl"),
        "train": write_jsonl(
            [{"prompt": x} for x in task.sample_prompts(TRAIN_PROMPTS, "train", seed=1)],
            out / "train.jsonl",
        ),
        "eval": write_jsonl(
            [{"prompt": x} for x in task.sample_prompts(EVAL_PROMPTS, "test", seed=2)],
            out / "eval.jsonl",
        ),
    }
    return paths


def warm_start(family: str, seed: int, steps: int, demos: Path, out: Path) -> Path:
    """Build the random ``family`` model and fine-tune it on ``demos`` (skipped when done)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slhf_models.sft import read_rows, save_sft, source_manifest, train_sft
    from slhf_models.tiny import build_tiny_model

    target = out / f"sft-{family}"
    if (target / "slhf.json").exists():
        print(f"{target} exists: reusing it")
        return target
    init = build_tiny_model(out / f"init-{family}", family=family, seed=seed, size=SIZE)
    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    config = SFTConfig(**{**asdict(SFT), "seed": seed, "steps": steps})
    template = source_manifest(init).template.to_config()
    losses = train_sft(model, tokenizer, read_rows(demos), config, template)
    return save_sft(model, tokenizer, init, target, config, demos=str(demos), final_loss=losses[-1])


def stackelberg(base: Path, data: dict[str, Path], out: Path, resume: bool) -> Path:
    from slhf_models.trainer.cli import main as train_main

    overrides = [
        f"model={base}",
        f"dataset={data['train']}",
        f"eval_dataset={data['eval']}",
        f"output_dir={out / 'gda'}",
    ]
    if resume and (out / "gda" / "checkpoints").exists():
        overrides.append("resume_from=latest")
    if train_main([str(RECIPE), *overrides]) != 0:
        raise SystemExit("the StackelbergGDA run failed (see above)")
    return out / "gda" / "final"


def ship(final: Path, dest: Path, provenance: dict[str, Any]) -> Path:
    """Copy ``final`` to ``dest`` in bfloat16 with a manifest for serving."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(final).save_pretrained(tmp)
    trained = Manifest.load(final)
    role = {"sampling": SAMPLING}
    manifest = trained.model_copy(
        update={
            "name": SHIPPED_NAME,
            "base_model": ".",
            "leader": trained.leader.model_copy(update=role),
            "follower": trained.follower.model_copy(update=role),
            "default_rounds": 1,
            "provenance": {**trained.provenance, "demo": provenance},
        }
    )
    manifest.save(tmp)
    for path in tmp.iterdir():  # some writers create owner-only files; a model is for everyone
        path.chmod(0o644)
    tmp.chmod(0o755)
    for extra in ("eval", "README.md"):  # keep the committed report and notes
        if (dest / extra).exists():
            shutil.move(str(dest / extra), tmp / extra)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slhf_models.demo", description=__doc__)
    parser.add_argument("out_dir", type=Path, help="work folder (models, data, checkpoints)")
    parser.add_argument("--ship", type=Path, help="copy the final model here (bfloat16)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out_dir.absolute()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with _stage("data", timings):
        data = build_data(out)
    sft = {}
    for family, (seed, steps) in FAMILIES.items():
        with _stage(f"warm start {family}", timings):
            sft[family] = warm_start(family, seed, steps, data["demos"], out)
    with _stage("stackelberg", timings):
        final = stackelberg(sft["llama"], data, out, args.resume)
    timings["total"] = round(time.monotonic() - t0, 1)
    provenance = {
        "command": "python -m slhf_models.demo " + " ".join(sys.argv[1:] if argv is None else argv),
        "recipe": RECIPE.read_text(),
        "sft": asdict(SFT),
        "task": TASK,
        "demos": {"n": DEMOS, "follower_share": FOLLOWER_SHARE, "seed": 0},
        "prompts": {"train": TRAIN_PROMPTS, "eval": EVAL_PROMPTS},
        "families": FAMILIES,
        "size": SIZE,
        "threads": args.threads,
        "timings_s": timings,
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.platform()}",
        "git_commit": _git_commit(),
    }
    (out / "demo.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(timings))
    if args.ship:
        print(ship(final, args.ship.absolute(), provenance))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
