"""Scoring answers without full-vocabulary tensors (models/slhf_models/trainer/rollouts.py):
the chunked output head and the chunked log-softmax give the log-probabilities, entropies and
gradients of the plain full-softmax computation, for every chunk size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slhf_models.trainer.rollouts import Rollout, answer_logprobs_and_entropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
T = 0.7


def plain(model: Any, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference computation: every logit, a full fp32 log-softmax."""
    t = r.answer_mask.shape[1]
    pos = (r.attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=pos).logits
    log_p = torch.log_softmax(logits[:, -t - 1 : -1].float() / T, dim=-1)
    lp = log_p.gather(-1, r.input_ids[:, -t:, None]).squeeze(-1)
    ent = -(log_p.exp() * log_p).sum(-1).detach()
    return lp * r.answer_mask, ent * r.answer_mask


def rollout(vocab: int) -> Rollout:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # left padding of the prompt
    answer = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    attention[:, -4:] = answer
    return Rollout(ids, attention, answer, ["", "", ""], torch.zeros(3, dtype=torch.bool))


@pytest.fixture(scope="module")
def model(tiny: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)


@pytest.mark.parametrize("chunked_head", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_chunked_scoring_matches_the_full_softmax(
    model: Any, chunk: int, chunked_head: bool
) -> None:
    r = rollout(model.config.vocab_size)
    want_lp, want_ent = plain(model, r)
    (want_lp.sum() * 0.5).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    lp, ent = answer_logprobs_and_entropy(
        model, r, T, head_owner=model, chunk_tokens=chunk, chunked_head=chunked_head
    )
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    assert lp[1, 2:].eq(0).all() and not ent.requires_grad
    (lp.sum() * 0.5).backward()
    for name, param in model.named_parameters():  # float32 sums in another order: 1e-4 of max
        scale = float(want[name].abs().max())
        torch.testing.assert_close(param.grad, want[name], rtol=1e-3, atol=1e-4 * scale)
    model.zero_grad(set_to_none=True)


def test_the_output_head_is_restored_after_scoring(model: Any) -> None:
    head = model.get_output_embeddings()
    with torch.no_grad():
        answer_logprobs_and_entropy(model, rollout(model.config.vocab_size), T, chunk_tokens=2)
    assert "forward" not in vars(head)
    x = torch.randn(2, model.config.hidden_size)
    assert head(x).shape == (2, model.config.vocab_size)
