"""Supervised warm start: fine-tune a causal LM on demonstrations in the Leader template.

Each row ``{"prompt", "answer"}`` becomes ``T_L(prompt)`` (models/slhf_models/serving/templates.py)
followed by
the answer and the tokenizer's EOS; a row that also has a ``response`` becomes ``T_F(prompt,
response)`` and the answer. The loss is the mean cross-entropy over answer tokens only (prompt
tokens are masked with -100). Plain PyTorch AdamW loop on the model's device (CUDA when
available), seeded (data order and init of any randomness), batches padded on the right. The
result is an HF folder with an ``slhf.json`` (the input model's manifest, or a plain one, with
the SFT run in its provenance), ready to be served or to be the base and reference of
``slhf train``. How to run::

    python -m slhf_models.tasks.arith demos demos.jsonl --n 4000
    python -m slhf_models.sft MODEL_FOLDER demos.jsonl OUT_FOLDER --steps 600 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slhf_models.serving.manifest import Manifest, ManifestError
from slhf_models.serving.templates import TemplateConfig, TemplateRenderer

if TYPE_CHECKING:
    import torch

IGNORE = -100


@dataclass
class SFTConfig:
    """Settings of one warm-start run."""

    steps: int = 600
    """Optimizer steps (one batch each)."""
    batch_size: int = 32
    """Demonstrations per step."""
    learning_rate: float = 1e-3
    """AdamW learning rate, constant after a linear warm-up of ``warmup_steps``."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warm-up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int = 128
    """Longest prompt + answer in tokens; longer rows are cut on the right."""
    seed: int = 0
    """Seeds the data order and torch."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive; got {self.learning_rate}")


def encode_row(
    renderer: TemplateRenderer, tokenizer: Any, row: dict[str, Any], max_length: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one demonstration: prompt masked, answer + EOS supervised.

    A row with a ``response`` is rendered in the Follower template ``T_F(prompt, response)``.
    """
    response = row.get("response")
    if response is None:
        prompt_ids = renderer.encode_role("leader", row["prompt"], None)
    else:
        prompt_ids = renderer.encode_role("follower", row["prompt"], response)
    answer_ids = list(tokenizer.encode(row["answer"], add_special_tokens=False))
    answer_ids.append(tokenizer.eos_token_id)
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def _collate(
    batch: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for i, (row_ids, row_labels) in enumerate(batch):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, labels, mask


def source_manifest(source: str | Path) -> Manifest:
    """The manifest the fine-tuned folder inherits: ``source``'s, or a plain model's."""
    try:
        return Manifest.load(source)
    except ManifestError:
        return Manifest.for_plain_model(f"{Path(source).name}-sft")


def train_sft(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    config: SFTConfig,
    template: TemplateConfig | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place on ``rows``; return the loss of every step. ``template``:
    how prompts are rendered and encoded (the BOS rule included), which must be what the saved
    folder's manifest records (``source_manifest(...).template.to_config()``)."""
    import torch
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("no demonstrations to train on")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    renderer = TemplateRenderer(tokenizer, template)
    examples = [encode_row(renderer, tokenizer, r, config.max_length) for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = max(config.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    order: list[int] = []
    losses: list[float] = []
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(range(config.steps), desc="sft", disable=None)
    every = max(config.steps // 10, 1)  # without a terminal (logs, CI) the bar is off: print
    for step in bar:
        if len(order) < config.batch_size:  # a fresh seeded permutation per epoch
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        ids, labels, mask = (t.to(device) for t in _collate(batch, pad_id))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # mean over answers
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if bar.disable and (step + 1) % every == 0:
            print(f"sft step {step + 1}/{config.steps} loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


def save_sft(
    model: Any,
    tokenizer: Any,
    source: str | Path,
    out_dir: str | Path,
    config: SFTConfig,
    **info: Any,
) -> Path:
    """Write the HF folder and an ``slhf.json`` recording the run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = source_manifest(source)
    provenance = {**manifest.provenance, "sft": {**asdict(config), **info, "source": str(source)}}
    name = manifest.name if manifest.name.endswith("-sft") else f"{manifest.name}-sft"
    manifest.model_copy(update={"name": name, "base_model": ".", "provenance": provenance}).save(
        out
    )
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m slhf_models.sft", description=__doc__)
    parser.add_argument("model", help="model folder to start from (e.g. a slhf_models.tiny folder)")
    parser.add_argument("demos", help="demonstrations .jsonl with prompt and answer fields")
    parser.add_argument("out_dir")
    defaults = SFTConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = SFTConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # typed as the torch module it is: transformers' ``to`` (a functools.wraps of torch's) has no
    # usable signature for mypy, torch's has
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if torch.cuda.is_available():
        model.to("cuda")
    rows = read_rows(args.demos)
    template = source_manifest(args.model).template.to_config()
    losses = train_sft(model, tokenizer, rows, config, template)
    info = {"demos": args.demos, "final_loss": losses[-1]}
    print(save_sft(model, tokenizer, args.model, args.out_dir, config, **info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
