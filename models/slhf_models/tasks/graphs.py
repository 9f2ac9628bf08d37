"""Preference graphs over a handful of answers, and how often they have a cycle.

For one prompt and answers ``y_1..y_N``, the preference graph has an edge ``i → j`` when
``p(y_i ≻ y_j | x) > ½`` (ties add no edge). A transitive preference gives an acyclic graph; a
vote over criteria need not (the paper: 57% of HelpSteer2 prompts had a cycle).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from slhf_models.preferences import Preference
from slhf_models.serving.templates import Prompt


def preference_edges(
    prompt: Prompt, answers: Sequence[str], preference: Preference
) -> list[tuple[int, int]]:
    """Edges ``(i, j)`` with ``p(answers[i] ≻ answers[j]) > ½``; one batched preference call."""
    pairs = list(combinations(range(len(answers)), 2))
    if not pairs:
        return []
    p = preference(
        [prompt] * len(pairs), [answers[i] for i, _ in pairs], [answers[j] for _, j in pairs]
    )
    edges = []
    for (i, j), pij in zip(pairs, p, strict=True):
        if pij > 0.5:
            edges.append((i, j))
        elif pij < 0.5:
            edges.append((j, i))
    return edges


def has_cycle(n: int, edges: Sequence[tuple[int, int]]) -> bool:
    """Whether the directed graph on ``0..n-1`` has a cycle (iterative three-colour DFS)."""
    children: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        children[i].append(j)
    state = [0] * n  # 0 unseen, 1 on the stack, 2 done
    for root in range(n):
        if state[root]:
            continue
        stack = [(root, iter(children[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            child = next(it, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state[child] == 1:
                return True
            elif state[child] == 0:
                state[child] = 1
                stack.append((child, iter(children[child])))
    return False


def cycle_share(
    prompts: Sequence[Prompt], answer_sets: Sequence[Sequence[str]], preference: Preference
) -> float:
    """Share of prompts whose preference graph over their answers has a cycle."""
    if len(prompts) != len(answer_sets) or not prompts:
        raise ValueError(
            f"need one answer set per prompt and at least one prompt; "
            f"got {len(prompts)} prompts and {len(answer_sets)} answer sets"
        )
    cyclic = sum(
        has_cycle(len(answers), preference_edges(x, answers, preference))
        for x, answers in zip(prompts, answer_sets, strict=True)
    )
    return cyclic / len(prompts)
