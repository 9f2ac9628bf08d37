"""A copy-heavy Follower for the drafting benchmark (docs/performance.md): ``bench/drafting.py
--model``.

The shipped demo model's Follower keeps the given answer's content and may change its frame, so
n-gram drafts from its prompt are right only part of the time. This builds the case drafting is
for: the shipped model fine-tuned (``slhf_models.sft``) until its Follower returns the given
answer verbatim. Rows are Condorcet demonstrations on train prompts (``slhf_models.tasks.
condorcet``, defects included) in the Follower template, each with ``answer`` = ``response``;
a quarter stay Leader rows so the Leader still answers. Seeded, on CPU, about a minute on the
2-core machine (one torch thread: two wait on each other there)::

    python bench/copy_model.py runs/bench/condorcet-copy
    python bench/drafting.py --model runs/bench/condorcet-copy --out bench/results/drafting_copy

An existing finished folder is reused. The script then checks what it built on held-out prompts
(greedy, plain transformers): the share of Follower outputs equal to the given answer, printed
and written into the folder's ``copy_check.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slhf_models.sft import SFTConfig

REPO = Path(__file__).resolve().parents[1]

ROWS, LEADER_SHARE, CHECK_PROMPTS = 4000, 0.25, 48
CONFIG = SFTConfig(steps=150, batch_size=32, learning_rate=1e-3, warmup_steps=10, max_length=192)


def copy_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` SFT rows: Follower rows whose answer is the given response, and Leader rows."""
    from slhf_models.tasks.condorcet import demonstrations

    rng = random.Random(f"copy-rows:{seed}")
    rows = []
    for row in demonstrations(n, seed=seed, follower_share=1.0):
        if rng.random() < LEADER_SHARE:
            rows.append({"prompt": row["prompt"], "answer": row["response"]})
        else:
            rows.append(
                {"prompt": row["prompt"], "response": row["response"], "answer": row["response"]}
            )
    return rows


def check_copies(folder: Path, n: int, seed: int) -> dict[str, Any]:
    """Greedy Follower outputs on ``n`` held-out prompts with clean given answers (the drafting
    benchmark's workload): how many equal the given answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.drafting import workload
    from slhf_models.serving.templates import TemplateRenderer
    from slhf_models.sft import source_manifest

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    renderer = TemplateRenderer(tokenizer, source_manifest(folder).template.to_config())
    same = 0
    for body in workload(n, seed):
        prompt, given = body["prompt"], body["response"]
        ids = torch.tensor([renderer.encode_role("follower", prompt, given)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=64, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        same += text.strip() == given.strip()
    return {"prompts": n, "verbatim_copies": same, "share": round(same / n, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=CONFIG.steps)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slhf_models.serving.loading import SHIPPED_MODEL_DIR
    from slhf_models.sft import save_sft, train_sft

    torch.set_num_threads(1)
    if (args.out_dir / "slhf.json").exists():
        print(f"{args.out_dir} exists: reusing it")
    else:
        config = SFTConfig(**{**asdict(CONFIG), "seed": args.seed, "steps": args.steps})
        tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
        model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL_DIR, dtype=torch.float32)
        t0 = time.monotonic()
        losses = train_sft(model, tokenizer, copy_rows(ROWS, args.seed), config)
        print(f"fine-tuned in {time.monotonic() - t0:.0f} s, final loss {losses[-1]:.4f}")
        save_sft(
            model,
            tokenizer,
            SHIPPED_MODEL_DIR,
            args.out_dir,
            config,
            demos=f"bench/copy_model.py copy_rows({ROWS}, seed={args.seed})",
            final_loss=losses[-1],
        )
    check = check_copies(args.out_dir, CHECK_PROMPTS, args.seed + 7)
    print(f"greedy Follower copies the given answer verbatim: {check}")
    (args.out_dir / "copy_check.json").write_text(json.dumps(check, indent=2) + "\n")


if __name__ == "__main__":
    main()
