"""Training prompts: loading (JSONL, parquet, Hugging Face datasets) and a resumable sampler.

Each row holds ``x`` in one field (``prompt_field``, default ``prompt``): a string, or a list of
chat messages ``[{"role", "content"}, ...]`` ending with a user turn. Rows are validated with the
same rules as the templates (models/slhf_models/serving/templates.py), so a bad row fails at load
time with its
number, not mid-run.

``PromptSampler`` walks a seeded permutation per epoch; its whole state is ``position`` (prompts
drawn so far), which the checkpoint stores, so a resumed run sees the same prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slhf_models.serving.templates import Prompt, TemplateError, to_messages


class DataError(ValueError):
    """Training prompts that cannot be loaded; the message names the file, row and field."""


def load_prompts(source: str, *, split: str = "train", field: str = "prompt") -> list[Prompt]:
    """Read prompts from a ``.jsonl``/``.parquet`` file or a Hugging Face dataset name."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    elif path.exists():
        raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
    else:
        rows = _read_hf(source, split)
    if not rows:
        raise DataError(f"{source}: no prompts")
    return [_prompt(row, i, field, source) for i, row in enumerate(rows)]


def _read_jsonl(path: Path) -> list[Any]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON: {e.msg}") from None
    return rows


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_table(path).to_pylist())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read parquet: {e}") from None


def _read_hf(name: str, split: str) -> list[Any]:
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as e:  # datasets raises many types (missing, offline, bad split)
        raise DataError(
            f"{name}: not a .jsonl/.parquet file and not a loadable Hugging Face dataset "
            f"(split {split!r}): {e}"
        ) from None


def _prompt(row: Any, i: int, field: str, source: str) -> Prompt:
    where = f"{source}: row {i}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a {field!r} field")
    if field not in row:
        raise DataError(f"{where}: no {field!r} field (fields: {', '.join(sorted(row))})")
    value = row[field]
    if not isinstance(value, (str, list)):
        raise DataError(f"{where}: {field!r} must be a string or a list of chat messages")
    try:
        messages = to_messages(value)
    except TemplateError as e:
        raise DataError(f"{where}: {e}") from None
    return value if isinstance(value, str) else messages


class PromptSampler:
    """Batches from a seeded permutation per epoch; ``position`` is its whole state.

    The epoch's permutation is built once (O(N) per epoch, O(1) per prompt drawn) and is the
    same shuffle as before it was cached, so older checkpoints resume onto the same prompts.
    """

    def __init__(self, prompts: Sequence[Prompt], seed: int, position: int = 0) -> None:
        self.prompts = list(prompts)
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        """The permutation of ``epoch`` (cached while the sampler is in it)."""
        if epoch != self._epoch:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def next_batch(self, batch_size: int) -> list[Prompt]:
        batch = []
        for _ in range(batch_size):
            epoch, index = divmod(self.position, len(self.prompts))
            batch.append(self.prompts[self.order(epoch)[index]])
            self.position += 1
        return batch
