"""Scoring answers without full-vocabulary tensors (models/slhf_models/trainer/rollouts.py):
the chunked output head and the chunked log-softmax give the log-probabilities, entropies and
gradients of the plain full-softmax computation, for every chunk size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slhf_models.trainer.rollouts import (
    Rollout,
    Tokens,
    answer_logprobs_and_entropy,
    follower_prompt_ids,
    generate,
    leader_span,
    score_spans,
    stop_token_ids,
    to_rollout,
)

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


# -- ids in, ids out: stops, padding, the spliced Follower row ------------------------------------
class _Tok:
    """What ``stop_token_ids`` and ``to_rollout`` read from a tokenizer."""

    def __init__(self, eos: int | None, pad: int | None) -> None:
        self.eos_token_id, self.pad_token_id = eos, pad

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return [" ".join(map(str, r)) for r in rows]


def test_stop_ids_join_the_generation_configs_and_pad_falls_back_to_eos() -> None:
    config = type("GenerationConfig", (), {"eos_token_id": [7, 9, 7]})()
    tokens = stop_token_ids(_Tok(eos=9, pad=None), config)
    assert tokens == Tokens(stop=(9, 7), pad=9)
    assert stop_token_ids(_Tok(eos=5, pad=0)) == Tokens(stop=(5,), pad=0)
    with pytest.raises(ValueError, match="no EOS"):
        stop_token_ids(_Tok(eos=None, pad=0), type("G", (), {"eos_token_id": None})())


def test_answers_end_at_the_first_of_any_stop_id() -> None:
    tokens = Tokens(stop=(9, 7), pad=0)
    r = to_rollout(_Tok(9, 0), tokens, [[1, 2], [3]], [[4, 7, 5, 9], [4, 4, 4]])
    assert r.answer_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert r.missing_eos.tolist() == [False, True]
    assert r.answer_ids() == [[4, 7], [4, 4, 4]]
    assert r.spoken_ids() == [[4], [4, 4, 4]]  # what the text and the splice are made of
    assert r.texts == ["4", "4 4 4"]
    assert r.prompt_ids() == [[1, 2], [3]]
    assert r.input_ids.tolist() == [[1, 2, 4, 7, 0], [0, 3, 4, 4, 4]]


def test_generate_stops_every_row_at_any_stop_id(model: Any) -> None:
    stop = tuple(range(3, model.config.vocab_size, 3))  # a third of the vocabulary ends answers
    tokens = Tokens(stop=stop, pad=0)
    torch.manual_seed(0)
    answers = generate(model, tokens, [[5, 6, 7], [8]], max_new_tokens=12, temperature=1.0, top_k=0)
    for a in answers:
        assert a and all(t not in stop for t in a[:-1])
    assert any(a[-1] in stop for a in answers)


def test_the_leader_scored_in_the_spliced_follower_row_is_scored_as_in_its_own_row(
    model: Any,
) -> None:
    """One pass over ``T_L(x) + y + tail + y'`` gives the Leader's log-probabilities of ``y``
    (its stop token included, whose column holds the tail) and the Follower's of ``y'``."""
    tokens = Tokens(stop=(2,), pad=0)
    tok = _Tok(2, 0)
    leader = to_rollout(
        tok, tokens, [[5, 6, 7], [8], [9, 10]], [[11, 12, 2], [13, 14, 15, 16], [2]]
    )  # stopped, cut off at max_new_tokens, empty
    tail = [3, 4]
    ids, offsets = follower_prompt_ids(leader, tail, render=lambda row, text: [])
    assert ids == [[5, 6, 7, 11, 12, 3, 4], [8, 13, 14, 15, 16, 3, 4], [9, 10, 3, 4]]
    follower = to_rollout(tok, tokens, ids, [[17, 2], [18, 19, 20], [2]])
    assert offsets is not None
    inside = leader_span(leader, follower, offsets)
    (lp_l, ent_l), (lp_f, ent_f) = score_spans(
        model,
        follower.input_ids,
        follower.attention_mask,
        [inside, follower.span()],
        T,
        chunk_tokens=2,
    )
    want_l, want_ent_l = answer_logprobs_and_entropy(model, leader, T)
    want_f, want_ent_f = answer_logprobs_and_entropy(model, follower, T)
    torch.testing.assert_close(lp_l, want_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_l, want_ent_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_f, want_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_f, want_ent_f, rtol=1e-5, atol=1e-5)
    assert (lp_l != 0).sum() == 3 + 4 + 1  # every Leader token, stops included


def test_a_template_without_the_splice_renders_the_follower_prompt() -> None:
    leader = to_rollout(_Tok(2, 0), Tokens((2,), 0), [[5], [6]], [[7, 2], [8]])
    ids, offsets = follower_prompt_ids(leader, None, render=lambda row, text: [row, len(text)])
    assert ids == [[0, 1], [1, 1]] and offsets is None
