"""Rollouts from token ids, the splice of the Follower prompt, and answer log-probabilities.

A ``Rollout`` keeps one role's batch as the model saw it: the left-padded prompt ids followed by
the sampled answer ids, with a mask that is 1 on answer tokens up to and including the first
stop token. The same tensors are then scored by the policy (with grad) and by the reference
(without), so both see identical inputs.

Prompts are token ids, rendered and encoded by the server's ``TemplateRenderer`` (the one place
that decides special tokens), and both rollout backends (``generate`` here, vllm_rollouts.py)
take ids and return the sampled ids. ``follower_prompt_ids`` builds ``T_F(x, y)`` the way the
server does (server/slhf_server/prompts.py): the Leader's prompt ids, the answer's sampled ids
and the template's fixed tail, where the template has that shape. The Follower's row then
begins with the Leader's whole sequence, so one forward pass over it scores both roles
(``Span``, ``score_spans``), and training sees the ids serving sees.

Stops: an answer ends at the first of the model's stop ids (``stop_token_ids``: the tokenizer's
EOS and every id of the generation config's ``eos_token_id``); padding is the tokenizer's pad
id, or the first stop id when it has none (padding is masked, its value is never read).

Log-probabilities are taken at the sampling temperature (logits / T), i.e. of the distribution
the answers were drawn from (top-k truncation aside).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint


@dataclass(frozen=True)
class Tokens:
    """The ids that end and pad answers: ``stop`` (every id that ends one, EOS first) and
    ``pad``."""

    stop: tuple[int, ...]
    pad: int


def stop_token_ids(tokenizer: Any, generation_config: Any | None = None) -> Tokens:
    """The tokenizer's EOS and the generation config's ``eos_token_id`` (an int or a list, as
    Llama 3 and Qwen2.5 ship several), and the pad id (the first stop id when the tokenizer has
    none)."""
    ids: list[int] = []
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(generation_config, "eos_token_id", None),
    ):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    if not ids:
        raise ValueError("the tokenizer and the generation config name no EOS token id")
    pad = getattr(tokenizer, "pad_token_id", None)
    return Tokens(stop=tuple(ids), pad=ids[0] if pad is None else int(pad))


@dataclass
class Rollout:
    """One role's prompts and sampled answers.

    Attributes:
        input_ids: ``(B, P + T)`` left-padded prompt ids, then answer ids (padded after the stop).
        attention_mask: ``(B, P + T)`` 1 on real prompt tokens and on answer tokens.
        answer_mask: ``(B, T)`` 1 on answer tokens up to and including the first stop token.
        texts: the decoded answers (special tokens dropped), what the next role and the
            preference see.
        missing_eos: ``(B,)`` True where the answer hit max_new_tokens without a stop token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    texts: list[str]
    missing_eos: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.answer_mask.shape[1]

    @property
    def answers(self) -> torch.Tensor:
        """``(B, T)`` the answer ids (padding after the stop token)."""
        return self.input_ids[:, self.prompt_len :]

    def micro(self, rows: slice) -> Rollout:
        return Rollout(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.answer_mask[rows],
            self.texts[rows],
            self.missing_eos[rows],
        )

    def prompt_ids(self) -> list[list[int]]:
        """Each row's prompt ids without padding."""
        p = self.prompt_len
        rows = zip(self.input_ids[:, :p], self.attention_mask[:, :p], strict=True)
        return [ids[mask.bool()].tolist() for ids, mask in rows]

    def answer_ids(self) -> list[list[int]]:
        """Each row's sampled ids, its stop token included (the checkpointed form)."""
        rows = zip(self.answers, self.answer_mask, strict=True)
        return [ids[mask.bool()].tolist() for ids, mask in rows]

    def spoken_ids(self) -> list[list[int]]:
        """Each row's answer ids without its stop token: the ids that detokenize to its text,
        which the Follower's prompt splices (as the server's ``answer_ids``)."""
        rows = zip(self.answer_ids(), self.missing_eos.tolist(), strict=True)
        return [ids if missing else ids[:-1] for ids, missing in rows]

    def span(self) -> Span:
        """The answers as a ``Span`` of this rollout's own rows."""
        b = self.input_ids.shape[0]
        start = torch.full((b,), self.prompt_len, dtype=torch.long, device=self.input_ids.device)
        return Span(start, self.answers, self.answer_mask)


@dataclass(frozen=True)
class Span:
    """One role's answer tokens inside scored rows: row ``b``'s answer token ``j`` is at column
    ``start[b] + j`` (so the state at column ``start[b] + j − 1`` predicts it) and is
    ``targets[b, j]``, where ``mask[b, j]`` is 1. The column of a stop token may hold another id
    (the Follower row continues with the template's tail): only the state before it is read."""

    start: torch.Tensor  # (B,) long
    targets: torch.Tensor  # (B, T) long
    mask: torch.Tensor  # (B, T)

    def micro(self, rows: slice) -> Span:
        return Span(self.start[rows], self.targets[rows], self.mask[rows])


@dataclass(frozen=True)
class RolloutPair:
    """A batch's Leader and Follower rollouts, row for row. ``leader_in_follower``: where the
    Follower's prompt was spliced from the Leader's sequence, the Leader's answers inside the
    Follower's rows (one pass over those rows scores both roles); None where it was rendered."""

    leader: Rollout
    follower: Rollout
    leader_in_follower: Span | None = None

    def micro(self, rows: slice) -> RolloutPair:
        inside = self.leader_in_follower
        return RolloutPair(
            self.leader.micro(rows),
            self.follower.micro(rows),
            None if inside is None else inside.micro(rows),
        )


def pad_left(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L)`` left-padded ids and their attention mask."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def cut_at_stop(ids: Sequence[int], stop: Sequence[int]) -> list[int]:
    """``ids`` up to and including the first stop id (all of them if none)."""
    stops = set(stop)
    for i, token in enumerate(ids):
        if token in stops:
            return list(ids[: i + 1])
    return list(ids)


def to_rollout(
    tokenizer: Any,
    tokens: Tokens,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
) -> Rollout:
    """A ``Rollout`` of prompt ids and sampled answer ids (each cut at its first stop id)."""
    cut = [cut_at_stop(a, tokens.stop) for a in answers]
    stops = set(tokens.stop)
    missing = torch.tensor([not a or a[-1] not in stops for a in cut], dtype=torch.bool)
    prompt_ids, prompt_mask = pad_left(prompts, tokens.pad)
    width = max(1, max((len(a) for a in cut), default=0))
    answer_ids = torch.full((len(cut), width), tokens.pad, dtype=torch.long)
    answer_mask = torch.zeros((len(cut), width), dtype=torch.long)
    for i, a in enumerate(cut):
        answer_ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        answer_mask[i, : len(a)] = 1
    spoken = [a if m else a[:-1] for a, m in zip(cut, missing.tolist(), strict=True)]
    return Rollout(
        input_ids=torch.cat([prompt_ids, answer_ids], dim=1).to(device),
        attention_mask=torch.cat([prompt_mask, answer_mask], dim=1).to(device),
        answer_mask=answer_mask.to(device),
        texts=tokenizer.batch_decode(spoken, skip_special_tokens=True),
        missing_eos=missing.to(device),
    )


def follower_prompt_ids(
    leader: Rollout, tail: Sequence[int] | None, render: Callable[[int, str], list[int]]
) -> tuple[list[list[int]], torch.Tensor | None]:
    """Each row's ``T_F(x, y)`` and, where it is spliced, the column of the Leader's answer in
    the Follower rollout's rows (before left padding is known: the offset of ``y`` in each
    prompt). ``tail``: the template's ids after the answer (``TemplateRenderer.follower_tail``),
    or None where the splice does not hold; then ``render(b, text)`` gives row ``b``'s rendered
    ids and no offsets are returned."""
    if tail is None:
        return [render(b, text) for b, text in enumerate(leader.texts)], None
    prompts, spoken = leader.prompt_ids(), leader.spoken_ids()
    rows = [[*p, *y, *tail] for p, y in zip(prompts, spoken, strict=True)]
    return rows, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def leader_span(leader: Rollout, follower: Rollout, offsets: torch.Tensor) -> Span:
    """The Leader's answers inside the spliced Follower rows (see ``follower_prompt_ids``)."""
    prompt_lengths = follower.attention_mask[:, : follower.prompt_len].sum(dim=1)
    pads = follower.prompt_len - prompt_lengths  # left padding of each Follower row
    start = pads + offsets.to(pads.device)
    return Span(start, leader.answers, leader.answer_mask)


def generate(
    model: Any,
    tokens: Tokens,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    synced: bool = False,
) -> list[list[int]]:
    """Sample one answer per prompt (left padding; torch's global RNG); each answer's ids up to
    and including its first stop id. ``synced``: every process runs the same number of forward
    passes until all are done (a sharded model needs all of them in each one); a process whose
    answers ended early runs on without sampling. Runs in ``torch.inference_mode`` (cheaper
    than ``no_grad``), except under FSDP, whose gathered parameters serve training later."""
    ids, mask = pad_left(prompts, tokens.pad)
    was_training = model.training
    model.eval()
    with torch.inference_mode(not synced):
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokens.pad,
            eos_token_id=list(tokens.stop),
            synced_gpus=synced,
        )  # (B, P + T'), T' ≤ max_new_tokens
    model.train(was_training)
    return [cut_at_stop(row, tokens.stop) for row in out[:, ids.shape[1] :].tolist()]


def answer_logprobs_and_entropy(
    model: Any, rollout: Rollout, temperature: float, **chunking: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` answer log-probabilities and entropies of ``rollout``'s own rows
    (``score_spans`` with one span)."""
    return score_spans(
        model, rollout.input_ids, rollout.attention_mask, [rollout.span()], temperature, **chunking
    )[0]


def score_spans(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    spans: Sequence[Span],
    temperature: float,
    *,
    head_owner: Any | None = None,
    chunk_tokens: int = 512,
    chunked_head: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per span, ``(B, T)`` answer log-probabilities (with grad when grad is on) and ``(B, T)``
    entropies (detached) of the sampling distribution at each answer position, both 0 on
    padding, from one forward pass over the rows (the Follower's row scores both roles).

    Memory (docs/trainer.md, "Memory"): only the positions from the first one that predicts an
    answer token leave the decoder (``logits_to_keep``), and no ``(B, T, vocabulary)`` tensor is
    built. With ``chunked_head`` the output head itself runs on ``chunk_tokens`` answer
    positions at a time (padding skipped), in float32, inside activation checkpointing, so the
    backward pass recomputes a chunk's logits instead of keeping them: the peak is one chunk's
    logits, not every row's (TRL's ``selective_log_softmax`` still materialises the model's
    logits). Without it (a model whose head is sharded by FSDP, or one that post-processes its
    logits) the model returns its logits and only the float32 log-softmax is chunked.

    ``head_owner`` is the model without its DDP wrapper (where the output head is found);
    ``model`` is what is called (maybe DDP/FSDP-wrapped).
    """
    owner = model if head_owner is None else head_owner
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate() numbers them
    width = input_ids.shape[1]
    firsts = [
        int((s.start - 1).min()) for s in spans if s.mask.numel() and s.start.numel()
    ]  # the first column whose state predicts an answer token
    first = max(0, min(firsts, default=width - 1))
    keep = width - first
    chunked_head = chunked_head and _plain_head(owner)
    head = owner.get_output_embeddings() if chunked_head else None
    with _head_returns_input(head):
        states = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
        ).logits  # (B, keep, H) hidden states or (B, keep, V) logits from column `first`
    return [_score_span(states, first, span, head, temperature, chunk_tokens) for span in spans]


def _score_span(
    states: torch.Tensor,
    first: int,
    span: Span,
    head: Any | None,
    temperature: float,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = span.mask.nonzero(as_tuple=True)  # the answer positions only
    at = span.start[rows] + cols - 1 - first  # the column (in ``states``) that predicts each
    targets = span.targets[rows, cols]
    logprobs, entropy = [], []
    for start in range(0, len(rows), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        args = (states, rows[part], at[part], targets[part], head, temperature)
        if torch.is_grad_enabled():  # keep only the inputs; recompute the chunk in backward
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logprobs.append(lp)
        entropy.append(ent)
    zeros = torch.zeros(span.mask.shape, dtype=torch.float32, device=states.device)
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
