"""Synthetic preference tasks: prompt generators with train/held-out splits, programmatic
preferences (votes over attributes), and mixed-quality demonstrations for a warm start.

``arith``: short sums and differences (models/tasks/arith.py).
"""

TASKS = ("arith",)
