"""The loss half of a training step: both roles' rollouts scored, one loss per role, backward.

``StackelbergTrainer`` (models/slhf_models/trainer/trainer.py) samples a step's Leader and Follower
rollouts
and its preferences; ``RoleLosses.accumulate`` does the rest of the gradient, per micro-batch:

1. score: the policy's log-probabilities (with grad) and entropies and the reference's
   log-probabilities of the same tokens on the same templates. With LoRA the reference is the
   base model with the adapters disabled (no second copy); in a full fine-tune, ``ref_model``;
2. ``RoleLosses.role_loss`` per role, for either topology (``objective.role_loss``: the role's
   scores, advantages and REINFORCE loss), its stats keyed as the trainer logs them, metric first
   and role second (``loss/leader``, ``sequence_kl/follower``, ``entropy/leader``, ...); then
   ``preference`` and ``loss`` (the sum the step trained on);
3. backward, each loss divided by the number of micro-batches.

The two weight topologies differ only in their passes and backward calls:

- shared weights: the gradient of ``L_L + κ·L_F`` (``κ·L_F`` alone on steps without a Leader
  update). Where the Follower's prompt was spliced from the Leader's sequence (the template
  allows it: ``TemplateRenderer.follower_tail``), the Follower's rows ``T_L(x) + y + tail + y'``
  hold the Leader's answers too: one policy pass, one reference pass and one backward over them
  score and train both roles (docs/trainer.md, "Speed"). Otherwise a pass and a backward per
  role, the Follower's first: one role's activations at a time, each role's rows padded to its
  own length only (docs/trainer.md, "Memory");
- separate adapters: each role's pass on its own adapter and a backward per role (the Follower's
  κ is in its learning rate). The Leader goes first, so the Follower's backward is the
  micro-batch's last one, and the Follower's KL in the Leader's reward (``leader_objective:
  full``) comes from a Follower pass without grad.

Under several processes gradients are averaged only on a step's last backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from accelerate import Accelerator

from slhf_models.serving.templates import ROLES, Role
from slhf_models.trainer import objective
from slhf_models.trainer.config import StackelbergConfig
from slhf_models.trainer.objective import ObjectiveParams, RoleRollout, Stats, sequence_kl
from slhf_models.trainer.rollouts import Rollout, RolloutPair, Span, score_spans
from slhf_models.trainer.weights import release_freed_cpu_memory


def objective_params(config: StackelbergConfig) -> ObjectiveParams:
    """The loss hyper-parameters of a run."""
    return ObjectiveParams(
        tau_leader=config.tau_leader,
        tau_follower=config.tau_follower,
        estimator=config.kl_estimator,
        baseline=config.baseline,
        leader_objective=config.leader_objective,
        missing_eos_penalty=config.missing_eos_penalty,
    )


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a step: both roles' rollouts, on the same rows, and their preferences.

    Attributes:
        count: the step's number of micro-batches (each loss is divided by it).
        last: whether this is the step's last one (gradients sync across processes on its
            backward pass).
        advantages: each role's advantages on these rows when computed over the whole step
            (the leave-one-out baseline with several micro-batches); None: from these rows.
    """

    rollouts: RolloutPair
    prefs: torch.Tensor
    count: int
    last: bool
    advantages: dict[Role, torch.Tensor] | None = None


@contextmanager
def as_role(policy: Any, adapter: str | None) -> Iterator[None]:
    """Run the block on ``adapter`` (separate adapters); with shared weights nothing changes."""
    if adapter is not None:
        policy.set_adapter(adapter)
    yield


class RoleLosses:
    """Scores a step's rollouts and runs its backward passes; see the module docstring.

    ``model`` is the policy as the accelerator prepared it (maybe DDP/FSDP-wrapped);
    ``adapters`` maps each role to its peft adapter (None: shared weights).
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any | None,
        accelerator: Accelerator,
        config: StackelbergConfig,
        adapters: dict[Role, str | None],
        pad_token_id: int,
        *,
        sharded: bool = False,
    ) -> None:
        self.sharded = sharded  # FSDP: parameters are sharded DTensors
        self.model = model
        self.ref_model = ref_model
        self.accelerator = accelerator
        self.config = config
        self.adapters = adapters
        self.pad_token_id = pad_token_id

    @functools.cached_property
    def policy(self) -> Any:
        """The model without its DDP/FSDP wrapper (unwrapped once: it does not change)."""
        return self.accelerator.unwrap_model(self.model)

    def accumulate(
        self, rollouts: RolloutPair, prefs: torch.Tensor, update_leader: bool
    ) -> dict[str, torch.Tensor]:
        """Backward passes of a step, micro-batch by micro-batch; the stats' batch means (0-d
        tensors: nothing is read back to the host here)."""
        cfg = self.config
        n = cfg.gradient_accumulation_steps
        size = cfg.batch_size // n
        backward = self._shared if cfg.follower_weights == "shared" else self._separate
        step_advantages = None
        if cfg.baseline == "leave_one_out" and n > 1:
            step_advantages = self._step_advantages(rollouts, prefs, size)
        totals: dict[str, torch.Tensor] = {}
        for i in range(n):
            rows = slice(i * size, (i + 1) * size)
            shared = (
                None
                if step_advantages is None
                else {r: a[rows] for r, a in step_advantages.items()}
            )
            batch = MicroBatch(rollouts.micro(rows), prefs[rows], n, i == n - 1, shared)
            stats = backward(batch, update_leader)
            for key, value in stats.items():
                part = value.detach().float() / n
                totals[key] = totals[key] + part if key in totals else part
        return totals

    def _step_advantages(
        self, rollouts: RolloutPair, prefs: torch.Tensor, size: int
    ) -> dict[Role, torch.Tensor]:
        """Both roles' leave-one-out advantages over the whole step, so that micro-batches
        share the baseline of the batch. The Leader's ``full`` objective needs every row's
        Follower KL first: one pass without grad over the Follower's micro-batches."""
        params = objective_params(self.config)
        leader, follower = rollouts.leader, rollouts.follower
        follower_kl = None
        if params.leader_objective == "full":
            kls = []
            for start in range(0, len(follower.texts), size):
                scored = self._scored("follower", follower.micro(slice(start, start + size)), False)
                kls.append(sequence_kl(scored, params.estimator))
            follower_kl = torch.cat(kls)
        return {
            "leader": objective.role_advantages(
                "leader", prefs, leader.missing_eos, params, follower_kl
            ),
            "follower": objective.role_advantages("follower", prefs, follower.missing_eos, params),
        }

    def role_loss(
        self,
        role: Role,
        scored: RoleRollout,
        prefs: torch.Tensor,
        follower_kl: torch.Tensor | None = None,
        advantages: dict[Role, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Stats]:
        """``role``'s loss (``objective.role_loss``) and its stats, keyed ``metric/role``."""
        advantage = None if advantages is None else advantages[role]
        loss, stats = objective.role_loss(
            role, scored, prefs, objective_params(self.config), follower_kl, advantage
        )
        return loss, {f"{metric}/{role}": value for metric, value in stats.items()}

    # -- the two topologies ------------------------------------------------------------------------
    def _shared(self, batch: MicroBatch, update_leader: bool) -> Stats:
        """The gradient of ``L_L + κ·L_F`` (``κ·L_F`` alone). Where the Follower's rows begin
        with the Leader's sequence (spliced), one pass over them scores both roles and one
        backward takes both losses; otherwise a pass and a backward per role."""
        if batch.rollouts.leader_in_follower is not None:
            return self._shared_one_pass(batch, update_leader)
        return self._shared_per_role(batch, update_leader)

    def _shared_one_pass(self, batch: MicroBatch, update_leader: bool) -> Stats:
        """Both roles from the Follower's rows: the Leader's answer tokens are predicted by the
        same states whether the row goes on with the Follower's tail or not (causal
        attention), so the Leader's log-probabilities are those of its own rows, and the
        Leader's pass is not run at all (docs/trainer.md, "Speed")."""
        cfg, prefs, pair = self.config, batch.prefs, batch.rollouts
        inside = pair.leader_in_follower
        assert inside is not None
        spans = [inside, pair.follower.span()]
        with self._sync(batch.last):
            (lead, foll) = self._scored_spans(pair.follower, spans, grad=True)
            lead = _answers_of(lead, pair.leader)
            foll = _answers_of(foll, pair.follower)
            loss_f, stats_f = self.role_loss("follower", foll, prefs, None, batch.advantages)
            follower_kl = sequence_kl(foll, cfg.kl_estimator)  # detached
            if not update_leader:
                lead = _detached(lead)
            loss_l, stats = self.role_loss("leader", lead, prefs, follower_kl, batch.advantages)
            total = cfg.kappa * loss_f + (loss_l if update_leader else 0.0)
            self.accelerator.backward(total / batch.count)
        release_freed_cpu_memory(self.accelerator.device)
        return stats | stats_f | _step_stats(prefs, total.detach())

    def _shared_per_role(self, batch: MicroBatch, update_leader: bool) -> Stats:
        """A pass and a backward per role, the Follower's first (its KL is the Leader's reward
        term), then the Leader's, so only one role's activations are alive at a time and the
        Leader's short rows are never padded to the Follower's length. The sum of the two
        gradients is the combined loss's."""
        cfg, prefs, pair = self.config, batch.prefs, batch.rollouts
        with self._sync(batch.last and not update_leader):
            foll = self._scored("follower", pair.follower)
            loss_f, stats_f = self.role_loss("follower", foll, prefs, None, batch.advantages)
            self.accelerator.backward(cfg.kappa * loss_f / batch.count)
        release_freed_cpu_memory(self.accelerator.device)
        follower_kl = sequence_kl(foll, cfg.kl_estimator)  # detached
        with self._sync(batch.last), nullcontext() if update_leader else torch.no_grad():
            lead = self._scored("leader", pair.leader, update_leader)
            loss_l, stats = self.role_loss("leader", lead, prefs, follower_kl, batch.advantages)
            if update_leader:
                self.accelerator.backward(loss_l / batch.count)
        release_freed_cpu_memory(self.accelerator.device)
        total = cfg.kappa * loss_f.detach() + (loss_l.detach() if update_leader else 0.0)
        return stats | stats_f | _step_stats(prefs, total)

    def _separate(self, batch: MicroBatch, update_leader: bool) -> Stats:
        """A pass and a backward per role on its adapter, the Leader's first (if it trains).
        The reference (adapters off) scores both roles once: from the Follower's rows in one
        pass where they were spliced from the Leader's sequence."""
        cfg, prefs, pair = self.config, batch.prefs, batch.rollouts
        refs = self._pair_refs(pair)
        follower_kl = None  # read by the Leader's score with leader_objective "full" only
        if cfg.leader_objective == "full" and batch.advantages is None:
            follower = self._scored("follower", pair.follower, False, refs["follower"])
            follower_kl = sequence_kl(follower, cfg.kl_estimator)
        stats: Stats = {}
        trained_losses = []
        for role, rollout in zip(ROLES, (pair.leader, pair.follower), strict=True):
            trained = role == "follower" or update_leader
            with self._sync(batch.last and role == "follower"):
                scored = self._scored(role, rollout, trained, refs[role])
                loss, role_stats = self.role_loss(
                    role, scored, prefs, follower_kl, batch.advantages
                )
                if trained:
                    self.accelerator.backward(loss / batch.count)
                    trained_losses.append(loss.detach())
            release_freed_cpu_memory(self.accelerator.device)
            stats |= role_stats
        total = sum(trained_losses[1:], start=trained_losses[0])  # the Follower always trains
        return stats | _step_stats(prefs, total)

    def _pair_refs(self, pair: RolloutPair) -> dict[Role, torch.Tensor]:
        """Both roles' reference log-probabilities: one pass over the Follower's rows where the
        Leader's answers are in them, else one pass per role."""
        if pair.leader_in_follower is not None:
            spans = [pair.leader_in_follower, pair.follower.span()]
            leader, follower = self._ref_scores(pair.follower, spans)
            return {"leader": leader, "follower": follower}
        return {
            role: self._ref_scores(rollout, [rollout.span()])[0]
            for role, rollout in zip(ROLES, (pair.leader, pair.follower), strict=True)
        }

    # -- scoring -----------------------------------------------------------------------------------
    def _sync(self, last: bool) -> AbstractContextManager[Any]:
        """Average gradients across processes only on a step's last backward pass."""
        return nullcontext() if last else self.accelerator.no_sync(self.model)

    def _chunking(self, owner: Any) -> dict[str, Any]:
        """How ``answer_logprobs_and_entropy`` chunks the output head for ``owner``'s model: the
        head runs chunk by chunk unless FSDP shards it (then the model computes its logits)."""
        return {
            "head_owner": owner,
            "chunk_tokens": self.config.logprob_chunk_tokens,
            "chunked_head": not self.sharded,
        }

    def _ref_scores(self, rows: Rollout, spans: list[Span]) -> list[torch.Tensor]:
        t = self.config.temperature
        with torch.no_grad():
            if self.ref_model is not None:
                model, owner, adapters_off = self.ref_model, self.ref_model, nullcontext()
            else:
                model = owner = self.policy
                adapters_off = self.policy.disable_adapter()
            with adapters_off:
                scored = score_spans(
                    model, rows.input_ids, rows.attention_mask, spans, t, **self._chunking(owner)
                )
        return [logprobs for logprobs, _ in scored]

    def _scored_spans(
        self,
        rows: Rollout,
        spans: list[Span],
        grad: bool,
        refs: list[torch.Tensor] | None = None,
    ) -> list[RoleRollout]:
        """Each span of ``rows`` scored by the policy (with grad when ``grad``) and the
        reference (``refs`` where they are already known): one pass of each over the rows.
        ``mask`` and ``missing_eos`` are left to the caller (``_answers_of``)."""
        with nullcontext() if grad else torch.no_grad():
            scored = score_spans(
                self.model,
                rows.input_ids,
                rows.attention_mask,
                spans,
                self.config.temperature,
                **self._chunking(self.policy),
            )
        if refs is None:
            refs = self._ref_scores(rows, spans)
        return [
            RoleRollout(lp, ref, span.mask, rows.missing_eos, ent)
            for (lp, ent), ref, span in zip(scored, refs, spans, strict=True)
        ]

    def _scored(
        self, role: Role, rollout: Rollout, grad: bool = True, ref: torch.Tensor | None = None
    ) -> RoleRollout:
        """``rollout``'s answers scored with ``role``'s weights (``ref``: the reference's
        log-probabilities when already known)."""
        with as_role(self.policy, self.adapters[role]):
            refs = None if ref is None else [ref]
            return self._scored_spans(rollout, [rollout.span()], grad, refs)[0]


def _answers_of(scored: RoleRollout, rollout: Rollout) -> RoleRollout:
    """``scored`` with ``rollout``'s answer mask and missing-EOS flags."""
    return replace(scored, mask=rollout.answer_mask, missing_eos=rollout.missing_eos)


def _detached(scored: RoleRollout) -> RoleRollout:
    return replace(scored, logprobs=scored.logprobs.detach())


def _step_stats(prefs: torch.Tensor, loss: torch.Tensor) -> Stats:
    """The stats of the roles together: the Leader's mean win rate and the loss trained on."""
    return {"preference": prefs.detach().float().mean(), "loss": loss}
