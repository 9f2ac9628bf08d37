"""Rollouts with Hugging Face ``generate`` and per-token log-probabilities of the answers.

A ``Rollout`` keeps one role's batch as the model saw it: the left-padded prompt ids (rendered by
``TemplateRenderer``, the server's templates) followed by the sampled answer ids, with a mask
that is 1 on answer tokens up to and including the first EOS. The same tensors are then scored
by the policy (with grad) and by the reference (without), so both see identical inputs.

``encode_prompts`` is the one prompt tokenization of both rollout backends (vllm_rollouts.py
samples from the same ids) and ``to_rollout`` the one way answers become a ``Rollout``.

Log-probabilities are taken at the sampling temperature (logits / T), i.e. of the distribution
the answers were drawn from (top-k truncation aside).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint


@dataclass
class Rollout:
    """One role's prompts and sampled answers.

    Attributes:
        input_ids: ``(B, P + T)`` left-padded prompt ids, then answer ids (padded after EOS).
        attention_mask: ``(B, P + T)`` 1 on real prompt tokens and on answer tokens.
        answer_mask: ``(B, T)`` 1 on answer tokens up to and including the first EOS.
        texts: the decoded answers (special tokens dropped), what the next role and the
            preference see.
        missing_eos: ``(B,)`` True where the answer hit max_new_tokens without EOS.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    texts: list[str]
    missing_eos: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.answer_mask.shape[1]

    def micro(self, rows: slice) -> Rollout:
        return Rollout(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.answer_mask[rows],
            self.texts[rows],
            self.missing_eos[rows],
        )


def _answer_mask(answers: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` mask up to and including the first EOS, and ``(B,)`` missing-EOS flags."""
    is_eos = answers == eos_token_id
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the 1st EOS
    return (~after_eos).long(), ~is_eos.any(dim=1)


def encode_prompts(tokenizer: Any, prompt_texts: list[str], *, add_special_tokens: bool) -> Any:
    """The rendered prompts as one left-padded batch: the token ids every backend samples from."""
    tokenizer.padding_side = "left"
    return tokenizer(
        prompt_texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
    )


def prompt_token_ids(enc: Any) -> list[list[int]]:
    """Each row of ``encode_prompts``'s batch without its left padding."""
    rows = zip(enc.input_ids, enc.attention_mask, strict=True)
    return [ids[mask.bool()].tolist() for ids, mask in rows]


def to_rollout(tokenizer: Any, enc: Any, answers: torch.Tensor, lengths: torch.Tensor) -> Rollout:
    """A ``Rollout`` from the prompt batch and ``(B, T)`` answer ids of which each row's first
    ``lengths`` were sampled (the rest is padding); both on the same device."""
    answer_mask, missing = _answer_mask(answers, tokenizer.eos_token_id)
    positions = torch.arange(answers.shape[1], device=answers.device)
    sampled = positions[None, :] < lengths.to(answers.device)[:, None]
    answer_mask = answer_mask * sampled.long()
    answers = answers.masked_fill(answer_mask == 0, tokenizer.pad_token_id)
    return Rollout(
        input_ids=torch.cat([enc.input_ids, answers], dim=1),
        attention_mask=torch.cat([enc.attention_mask, answer_mask], dim=1),
        answer_mask=answer_mask,
        texts=tokenizer.batch_decode(answers, skip_special_tokens=True),
        missing_eos=missing,
    )


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt_texts: list[str],
    *,
    add_special_tokens: bool,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    synced: bool = False,
) -> Rollout:
    """Sample one answer per prompt text (left padding; torch's global RNG). ``synced``: every
    process runs the same number of forward passes until all are done (a sharded model needs
    all of them in each one); a process whose answers ended early runs on without sampling."""
    enc = encode_prompts(tokenizer, prompt_texts, add_special_tokens=add_special_tokens)
    was_training = model.training
    model.eval()
    out = model.generate(
        **enc.to(model.device),
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced,
    )  # (B, P + T'), T' ≤ max_new_tokens
    model.train(was_training)
    answers = out[:, enc.input_ids.shape[1] :]  # (B, T'); rows end at EOS, then padding
    return to_rollout(tokenizer, enc, answers, torch.full((len(answers),), answers.shape[1]))


def answer_logprobs(
    model: Any, rollout: Rollout, temperature: float, **chunking: Any
) -> torch.Tensor:
    """``(B, T)`` log-probabilities of the answer tokens under ``model`` (0 on padding)."""
    return answer_logprobs_and_entropy(model, rollout, temperature, **chunking)[0]


def answer_logprobs_and_entropy(
    model: Any,
    rollout: Rollout,
    temperature: float,
    *,
    head_owner: Any | None = None,
    chunk_tokens: int = 512,
    chunked_head: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` answer log-probabilities (with grad when grad is on) and ``(B, T)`` entropies
    (detached) of the sampling distribution at each answer position, both 0 on padding.

    Memory (docs/trainer.md, "Memory"): only the ``T`` positions that predict answer tokens
    leave the decoder (``logits_to_keep``), and no ``(B, T, vocabulary)`` tensor is built. With
    ``chunked_head`` the output head itself runs on ``chunk_tokens`` answer positions at a time
    (padding skipped), in float32, inside activation checkpointing, so the backward pass
    recomputes a chunk's logits instead of keeping them: the peak is one chunk's logits, not
    every row's (TRL's ``selective_log_softmax`` still materialises the model's logits). Without
    it (a model whose head is sharded by FSDP, or one that post-processes its logits) the model
    returns its logits and only the float32 log-softmax is chunked.

    ``head_owner`` is the model without its DDP wrapper (where the output head is found);
    ``model`` is what is called (maybe DDP/FSDP-wrapped).
    """
    owner = model if head_owner is None else head_owner
    mask = rollout.attention_mask
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate() numbers left padding
    t = rollout.answer_mask.shape[1]
    chunked_head = chunked_head and _plain_head(owner)
    head = owner.get_output_embeddings() if chunked_head else None
    with _head_returns_input(head):
        states = model(
            input_ids=rollout.input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            logits_to_keep=t + 1,
        ).logits[:, :-1]  # (B, T, H) hidden states or (B, T, V) logits of the answer tokens
    targets = rollout.input_ids[:, -t:]  # (B, T)
    rows, cols = rollout.answer_mask.nonzero(as_tuple=True)  # the answer positions only
    logprobs, entropy = [], []
    for start in range(0, len(rows), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        args = (states, rows[part], cols[part], targets[rows[part], cols[part]], head, temperature)
        if torch.is_grad_enabled():  # keep only the inputs; recompute the chunk in backward
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logprobs.append(lp)
        entropy.append(ent)
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    if not logprobs:
        return zeros, zeros
    return (
        zeros.index_put((rows, cols), torch.cat(logprobs)),
        zeros.index_put((rows, cols), torch.cat(entropy)),
    )


def _chunk_logprobs(
    states: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    targets: torch.Tensor,
    head: Any | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and the entropy (no grad) of its distribution at the
    ``(rows, cols)`` positions of ``states``: hidden states through ``head``, or logits (``head``
    None). Only this chunk's float32 logits exist at a time."""
    picked = states[rows, cols]  # (n, H) or (n, V): a copy (advanced indexing)
    logits = (picked if head is None else head(picked)).float()  # (n, V), this chunk's own
    logits.div_(temperature)  # in place: no second (n, V) tensor (no backward reads it)
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - normaliser
    with torch.no_grad():  # H = log Z − Σ p·logit, without a second (n, V) product tensor
        entropy = normaliser - torch.einsum("nv,nv->n", logits.softmax(dim=-1), logits)
    return logprobs, entropy


def _plain_head(model: Any) -> bool:
    """Whether the model's logits are its output head's output, unscaled and uncapped (what the
    chunked head reproduces): not for models that soft-cap or scale their logits."""
    config = getattr(model, "config", None)
    scaled = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return head is not None and not scaled


@contextmanager
def _head_returns_input(head: Any | None) -> Iterator[None]:
    """While open, ``head`` returns its input: the model's forward yields hidden states."""
    if head is None:
        yield
        return
    head.forward = _identity  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
