"""Where a run's metrics go: ``output_dir/log.jsonl`` and, optionally, TensorBoard.

``report_to``:

- ``jsonl``: one JSON object per step (and per evaluation) in ``output_dir/log.jsonl``;
- ``tensorboard``: the same JSONL file, plus scalars in ``output_dir/tensorboard`` through
  ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package);
- ``none``: nothing besides the progress bar.

Only the main process writes (``active=False`` elsewhere). A resumed run first drops the lines of
steps after its checkpoint, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

METRICS_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsReporter:
    """Write per-step metrics to JSONL and TensorBoard; a context manager."""

    def __init__(self, output_dir: Path, report_to: str, *, start_step: int, active: bool) -> None:
        self.path = output_dir / METRICS_FILE
        self._log: Any = None
        self._writer: Any = None
        if not active or report_to == "none":
            return
        truncate_log(self.path, start_step)
        self._log = self.path.open("a", encoding="utf-8")
        if report_to == "tensorboard":
            self._writer = _summary_writer(output_dir / TENSORBOARD_DIR, start_step)

    def log(self, metrics: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(metrics) + "\n")
            self._log.flush()
        if self._writer is not None:
            step = int(metrics["step"])
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, float(value), step)
            self._writer.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricsReporter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _summary_writer(folder: Path, start_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError(
            "report_to: tensorboard needs the tensorboard package: pip install tensorboard "
            "(or set report_to: jsonl)"
        ) from None
    return SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None)


def truncate_log(path: Path, step: int) -> None:
    """Drop lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
