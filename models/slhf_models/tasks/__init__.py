"""Synthetic preference tasks: prompt generators with train/held-out splits, programmatic
preferences, and demonstrations for a warm start.

``arith``: short sums and differences with an attribute vote (models/slhf_models/tasks/arith.py).
``condorcet``: the paper's Condorcet example as text, three styles and three annotator groups
(models/slhf_models/tasks/condorcet.py).

Each task module exposes ``sample_prompts(n, split, seed=...)``, ``TaskPreference`` and
``demonstrations(n, ...)``; ``task:NAME`` in ``slhf train`` and ``slhf eval`` finds it here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("arith", "condorcet")


def task_module(name: str) -> ModuleType:
    """The module of task ``name``; ``ValueError`` naming the tasks for any other name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(f"slhf_models.tasks.{name}")
