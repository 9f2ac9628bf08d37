"""What a training run shows while it runs, and the check that stops it on failing preferences.

On a terminal: a tqdm progress bar with the latest loss, preference, KL and preference error
rate. Without one (a container's log, ``nohup``, CI): one compact line per ``log_every`` steps on
stderr, like the Hugging Face Trainer (one line; wrapped here)::

    step 10/1000 | loss 0.0123 | pref 0.512 | kl 0.0012/0.0034 | entropy 2.31/2.40
    | pref_err 0% | lr 1.00e-05 | 1.23 s/step

``kl`` and ``entropy`` are Leader/Follower means per token; ``s/step`` is the mean over the steps
since the previous line. Only the main process prints. The metrics themselves go to log.jsonl
(models/slhf_models/trainer/reporting.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from tqdm.auto import tqdm

from slhf_models.preferences import unscored


class PreferenceFailureError(RuntimeError):
    """Too many preference queries of a step failed; the run stops before that step's update."""


def preference_error_rate(
    values: Sequence[float], *, failed_total: int, queries_total: int, limit: float, step: int
) -> float:
    """The step's share of failed preference queries; raises above ``limit``.

    ``values`` are this process's preferences (for the first failure's reason); the totals are
    summed over every process, so all processes stop at the same step.
    """
    rate = failed_total / max(queries_total, 1)
    if rate > limit:
        failed = unscored(values)
        reason = failed[0].reason if failed else "(on another process)"
        raise PreferenceFailureError(
            f"step {step}: {failed_total} of {queries_total} preference queries failed "
            f"({rate:.0%} > max_preference_error_rate {limit:g}); the first: {reason}. "
            "The run stopped before this step's update, so the checkpoints so far are intact: "
            "fix the preference (is the judge up? does it return logprobs?) and resume with "
            "resume_from=latest, or raise max_preference_error_rate (1: never stop)"
        )
    return rate


def format_line(metrics: dict[str, Any], total: int, s_per_step: float) -> str:
    """The compact console line of one logging step (see the module docstring)."""
    m = metrics
    parts = [f"step {m['step']}/{total}", f"loss {m['loss']:.4f}", f"pref {m['preference']:.3f}"]
    for name, key, digits in (("kl", "sequence_kl", 4), ("entropy", "entropy", 2)):
        if f"{key}/leader" in m and f"{key}/follower" in m:
            lead, follow = m[f"{key}/leader"], m[f"{key}/follower"]
            parts.append(f"{name} {lead:.{digits}f}/{follow:.{digits}f}")
    parts.append(f"pref_err {m.get('preference_error_rate', 0.0):.0%}")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    parts.append(f"{s_per_step:.2f} s/step")
    return " | ".join(parts)


class Console:
    """A progress bar on a terminal, a line per logging step otherwise; a context manager."""

    def __init__(
        self,
        *,
        total: int,
        start: int,
        log_every: int,
        active: bool,
        stream: TextIO | None = None,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.log_every, self.active = total, log_every, active
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar: Any = None
        if active and self.tty:
            self.bar = tqdm(total=total, initial=start, file=self.stream, dynamic_ncols=True)
        self._since, self._last_step = time.perf_counter(), start

    def step(self, metrics: dict[str, Any]) -> None:
        """After every step: advance the bar, or print a line on logging steps."""
        step = int(metrics["step"])
        if self.bar is not None:
            self.bar.update(1)
            if step % self.log_every == 0:
                self.bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    pref=f"{metrics['preference']:.3f}",
                    kl=f"{metrics.get('sequence_kl/follower', 0.0):.4f}",
                    err=f"{metrics.get('preference_error_rate', 0.0):.0%}",
                )
            return
        if self.active and (step % self.log_every == 0 or step == self.total):
            now = time.perf_counter()
            s_per_step = (now - self._since) / max(step - self._last_step, 1)
            self._since, self._last_step = now, step
            print(format_line(metrics, self.total, s_per_step), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that does not break the bar (evaluations, the stop message)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
