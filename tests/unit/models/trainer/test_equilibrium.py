"""StackelbergGDA reaches the Stackelberg equilibrium: the trainer against the closed form.

The single-token Condorcet game of models/slhf_models/token_game.py on the tiny llama: one prompt,
answers
of one token, the paper's Condorcet preference over A, B, C (shares 0.40/0.35/0.25; any other
token loses to them), references = the model's own next-token distributions, the closed form
over the whole 1,024-token vocabulary. A random model ignores the answer in its Follower prompt
(its three rows are identical), so a short warm start first teaches it to read the answer:
40 steps of soft copying (half the mass on the given answer, a quarter on each other one). That
also moves the Leader's reference onto A, B and C. The warm-started model is the reference of the
run, and the closed form is computed from it, so the target is the trainer's own fixed point.

Trained with the defaults that matter here (k1, the full Leader objective) at τ = 0.5 and 0.1,
the Leader and every Follower row must end within total variation 0.1 of the closed form, and the
Follower's rows must differ from each other as the closed form's do.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slhf_models.game import total_variation
from slhf_models.preferences import CallablePreference
from slhf_models.serving.templates import TemplateConfig, TemplateRenderer
from slhf_models.tiny import build_tiny_model
from slhf_models.token_game import (
    DEFAULT_PROMPT,
    TokenGame,
    distances,
    equilibrium,
    policies,
    token_game,
)
from slhf_models.trainer.config import StackelbergConfig
from slhf_models.trainer.rollouts import pad_left
from slhf_models.trainer.trainer import StackelbergTrainer

#: The run: LoRA on the warm-started model, κ = 5, temperature 1, no top-k, a cosine schedule
#: after 10 warm-up steps; a short Follower instruction keeps the prompts short (the test runs
#: on a shared 2-core machine).
INSTRUCTION = "Improve it."
RUN: dict[str, Any] = dict(
    dataset="unused",
    max_new_tokens=1,
    temperature=1.0,
    top_k=0,
    batch_size=32,
    kappa=5.0,
    lora_r=16,
    lora_alpha=32.0,
    learning_rate=2e-3,
    lr_schedule="cosine",
    warmup_steps=10,
    follower_instruction=INSTRUCTION,
    report_to="none",
    log_every=1000,
)
STEPS = {0.5: 50, 0.1: 100}


def copy_warm_start(model: Any, renderer: TemplateRenderer, game: TokenGame, steps: int) -> None:
    """Soft copying on the Follower template: ½ on the given answer, ¼ on each other answer."""
    texts = [renderer.render_follower(DEFAULT_PROMPT, t) for t in game.answer_texts]
    input_ids, attention_mask = pad_left([renderer.encode(t) for t in texts], 0)
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    ids = list(game.answer_ids)
    target = torch.zeros(len(ids), game.vocab_size)
    for row, answer in enumerate(ids):
        target[row, ids] = 0.25
        target[row, answer] = 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            logits_to_keep=1,
        ).logits[:, -1]  # (3, V)
        loss = -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@dataclass
class Warm:
    path: Path
    model: Any
    renderer: TemplateRenderer
    game: TokenGame
    references: tuple[np.ndarray, np.ndarray]  # π_ref (V,), ω_ref (V, V)


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warm]:
    """The tiny llama after 40 copying steps, and its next-token distributions (references)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)
    # the tiny model's manifest predates the BOS rule: the trainer (template_bos auto) encodes
    # prompts as rendered, and so does this renderer
    config = TemplateConfig(INSTRUCTION, bos="as_rendered")
    renderer = TemplateRenderer(AutoTokenizer.from_pretrained(path), config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    game = token_game(renderer.tokenizer, model.config.vocab_size)
    torch.manual_seed(0)
    copy_warm_start(model, renderer, game, steps=40)
    references = policies(model, renderer.tokenizer, renderer)
    yield Warm(path, model, renderer, game, references)
    torch.set_num_threads(threads)


def rows_apart(follower: np.ndarray, game: TokenGame) -> float:
    """The smallest total variation between two of the answers' Follower rows."""
    rows = [follower[i] for i in game.answer_ids]
    return min(total_variation(a, b) for a, b in itertools.combinations(rows, 2))


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_trainer_reaches_the_closed_form_of_the_single_token_condorcet_game(
    warm: Warm, tmp_path: Path, tau: float
) -> None:
    game, tokenizer = warm.game, warm.renderer.tokenizer
    target = equilibrium(game, warm.references, tau, tau)
    cfg = StackelbergConfig(
        model=str(warm.path),
        output_dir=str(tmp_path),
        tau_leader=tau,
        tau_follower=tau,
        steps=STEPS[tau],
        **RUN,
    )
    assert (cfg.kl_estimator, cfg.leader_objective) == ("k1", "full")  # the defaults
    trainer = StackelbergTrainer(
        copy.deepcopy(warm.model),
        None,
        tokenizer,
        CallablePreference(game.preference),
        [DEFAULT_PROMPT],
        cfg,
    )
    trainer.train()
    trainer.policy.eval()
    trained = policies(trainer.policy, tokenizer, warm.renderer, rows=game.answer_ids)
    before, after = distances(game, warm.references, target), distances(game, trained, target)
    report = {k: (round(before[k], 3), round(after[k], 3)) for k in after}  # (reference, trained)
    assert max(after.values()) <= 0.1, report
    assert max(after.values()) < max(before.values()), report  # training moved towards it
    # the Follower answers each answer differently, as the closed form does
    assert rows_apart(target.follower, game) > 0.2
    assert rows_apart(trained[1], game) > 0.5 * rows_apart(target.follower, game), report
