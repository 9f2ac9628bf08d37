"""``StackelbergTrainer``: StackelbergGDA for LLMs (docs/algorithm.md, Algorithm 2).

One set of weights plays both roles through the server's templates
(models/slhf_models/serving/templates.py)::

    y_b  ~ π_θ(· | T_L(x_b))            Leader answer
    y'_b ~ π_θ(· | T_F(x_b, y_b))       Follower answer, conditioned on x_b and y_b
    p_b  = p(y_b ≻ y'_b | x_b)          one preference query per prompt
    L_L  = mean_b Σ_t [τL·G_b,t − (p_b + τF·KL̂_F,b − ½ − c·1[no EOS])] · log π_θ(y_b,t)
    L_F  = mean_b Σ_t [τF·G'_b,t − ((1 − p_b) − ½ − c·1[no EOS])] · log π_θ(y'_b,t)
    loss = L_L + κ·L_F      (shared weights; L_L only on every ``leader_update_every``-th step)

``G_t`` is the KL estimate of token t and every later one (the exact gradient of the answer's KL;
k3 adds its own gradient), ``KL̂_F`` the Follower's KL on its answer, which eq. 5 credits to the
Leader (``leader_objective: paper`` drops it, as Algorithm 2 does). See
models/slhf_models/trainer/objective.py
and docs/algorithm.md. This module samples a step's rollouts and preferences and steps the
optimiser; scoring, the role losses and the backward passes are
models/slhf_models/trainer/role_losses.py.
Per step the log has each role's loss terms, metric first (``loss/leader``,
``sequence_kl/follower``, ...,
with each role's mean per-token entropy ``entropy/leader``, ``entropy/follower``), ``preference``,
``loss`` and the learning rate (``lr``, after the schedule).

With ``follower_weights: separate_adapter`` the roles have their own LoRA adapters on one base
(``leader`` and ``follower``); each adapter gets its own role loss and the Follower's learning
rate is κ·η. "Leader parameters" are then the leader adapter, which changes only on Leader steps;
with shared weights every parameter serves both roles, so ``leader_update_every`` drops L_L from
the loss on the other steps but the shared weights still move with κ·L_F.

The reference π_ref scores the same tokens on the same templates: with LoRA it is the base model
with the adapters disabled (no second copy); in a full fine-tune, the ``ref_model`` passed in.

Departures from the paper's code (docs/algorithm.md): the KL penalty weights each token by the
KL still to come (k1 by default; the paper's small runs used k3 as a reward, whose expected
gradient is not the KL's); the Leader's reward includes τF·KL̂_F; an optional warm-up and decay
of the learning rate; log-probabilities are taken at the sampling temperature; dropout is off
while scoring; the leave-one-out baseline is the whole step's, also with gradient accumulation.
Rollouts: HF ``generate``, or vLLM with weight sync (``rollout_backend``; vllm_rollouts.py),
from the ids the server's templates give (the Follower prompt spliced from the Leader's
sequence where the template allows it, as the server does), ended by any of the model's stop
ids. With shared weights one generation call per step samples this batch's Follower answers and
the next batch's Leader answers (``rollout_schedule``; the Leader's answers are one step stale:
docs/algorithm.md, "One generation call per step").

Several processes (accelerate, no launcher of ours; distributed.py, docs/trainer.md): DDP through
``accelerator.prepare``, or FSDP2 under accelerate's FSDP environment, sharded here with
``fully_shard`` (policy and a full fine-tune's reference), parameters and optimizer taken after
sharding, rollouts in lockstep, checkpoints per process with ``torch.distributed.checkpoint``.
``batch_size`` is per process: every process draws the same global batch of
``batch_size × num_processes`` prompts and keeps its own slice, samples with seed ``seed + rank``,
and gradients are averaged across processes once per step. Metrics are averaged across
processes; only the main process writes logs and the final weights. One process on CPU is the
plain loop (rank 0, seed ``seed``). Example configs: recipes/accelerate/.

Run::

    slhf train run.yaml steps=100 output_dir=runs/x      # see models/slhf_models/trainer/cli.py
    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m slhf_models.trainer.cli run.yaml
    # two CPU processes:
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m slhf_models.trainer.cli run.yaml
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from slhf_models.preferences import Preference, unscored
from slhf_models.serving.templates import Prompt, Role, TemplateConfig, TemplateRenderer
from slhf_models.trainer import artefact, checkpoint, distributed, evaluation, weights
from slhf_models.trainer.artefact import config_hash, save_artefact
from slhf_models.trainer.config import StackelbergConfig
from slhf_models.trainer.console import Console, preference_error_rate
from slhf_models.trainer.data import PromptSampler
from slhf_models.trainer.reporting import METRICS_FILE, MetricsReporter
from slhf_models.trainer.role_losses import RoleLosses, as_role
from slhf_models.trainer.rollouts import (
    Rollout,
    RolloutPair,
    follower_prompt_ids,
    generate,
    leader_span,
    stop_token_ids,
    to_rollout,
)

if TYPE_CHECKING:  # imported at run time only for rollout_backend: vllm (in __init__)
    from slhf_models.trainer.vllm_rollouts import VllmRollouts

__all__ = ["METRICS_FILE", "TIMING_KEYS", "StackelbergTrainer", "config_hash"]
TIMING_KEYS = ("steps_per_s", "prompts_per_s", "time_s")


class StackelbergTrainer:
    """Train one model as Leader and Follower; see the module docstring."""

    def __init__(
        self,
        model: Any,
        ref_model: Any | None,
        tokenizer: Any,
        preference: Preference,
        train_dataset: Sequence[Prompt],
        config: StackelbergConfig,
        *,
        eval_dataset: Sequence[Prompt] | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        if ref_model is None and not config.use_lora:
            raise ValueError("a full fine-tune (use_lora: false) needs a ref_model")
        if config.eval_every and not eval_dataset:
            raise ValueError(f"eval_every is {config.eval_every} but no eval_dataset was given")
        separate = config.follower_weights == "separate_adapter"
        # separate adapters: the inactive role's adapter takes no part in a forward pass
        self.accelerator = accelerator or distributed.make_accelerator(
            find_unused_parameters=separate
        )
        # the BOS rule of the prompts' ids, resolved once (and recorded in the artefact)
        config = dataclasses.replace(config, template_bos=config.resolved_template_bos())
        self.mode = distributed.mode_of(self.accelerator)  # none, ddp or fsdp2
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.config = config
        self.tokenizer = tokenizer
        self.preference = preference
        self.eval_dataset = list(eval_dataset or [])
        self.renderer = TemplateRenderer(
            tokenizer,
            TemplateConfig(
                config.follower_instruction,
                config.template_layout,
                bos=config.resolved_template_bos(),
            ),
        )
        self.sampler = PromptSampler(train_dataset, config.seed)
        # the ids that end an answer (every EOS of the generation config) and pad one
        self.tokens = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        # T_F(x, y) = T_L(x) + y + tail, where the template has that shape (as the server)
        self.follower_tail, _ = self.renderer.follower_tail()
        self.pending: _Pending | None = None  # one_call: the next batch's Leader answers
        torch.manual_seed(config.seed)  # LoRA initialisation: the same on every process
        model = weights.prepare_policy(model, config)
        self.adapters: dict[Role, str | None] = {"leader": None, "follower": None}
        if separate:
            self.adapters = {"leader": "leader", "follower": "follower"}
        if self.mode == "fsdp2":  # sharded first: parameters and optimizer exist once, sharded
            self.model = distributed.shard(model, self.accelerator)
            self.params = weights.trainable_params(self.model, config.use_lora)
            self.optimizer = torch.optim.AdamW(
                weights.param_groups(self.params, config), weight_decay=0.0
            )
        else:
            groups = weights.param_groups(weights.trainable_params(model, config.use_lora), config)
            optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
            # what clipping, checkpoints and resume act on: the prepared model's parameters
            self.params = weights.trainable_params(self.policy, config.use_lora)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # the schedule's
        self.ref_model = None
        if ref_model is not None:
            ref_model = ref_model.eval().requires_grad_(False)
            if self.mode == "fsdp2":  # sharded like the policy, never replicated
                self.ref_model = distributed.shard(ref_model, self.accelerator)
            else:
                self.ref_model = ref_model.to(self.accelerator.device)
        self.losses = RoleLosses(
            self.model,
            self.ref_model,
            self.accelerator,
            config,
            self.adapters,
            self.tokens.pad,
            sharded=self.mode == "fsdp2",
        )
        self.vllm: VllmRollouts | None = None  # rollout_backend vllm
        if config.rollout_backend == "vllm":
            from slhf_models.trainer.vllm_rollouts import VllmRollouts

            self.vllm = VllmRollouts(
                config, self.tokens, rank=self.rank, num_processes=self.world, mode=self.mode
            )
            self._sync_rollout_weights()

    # -- setup -----------------------------------------------------------------------------------
    @functools.cached_property
    def policy(self) -> Any:
        """The model without its DDP/FSDP wrapper: for generate, adapters and saving (unwrapped
        once: the wrapper does not change after ``__init__``)."""
        return self.accelerator.unwrap_model(self.model)

    def _as_role(self, role: Role) -> AbstractContextManager[None]:
        """The policy plays ``role``: its adapter is active (separate adapters)."""
        return as_role(self.policy, self.adapters[role])

    # -- one step --------------------------------------------------------------------------------
    def _step(self, step: int) -> dict[str, Any]:
        cfg = self.config
        t0 = time.perf_counter()
        b = cfg.batch_size
        # 1.-3. a batch of prompts, Leader answers y ~ π(·|T_L(x)), Follower answers
        # y' ~ π(·|T_F(x, y)) (one generation call with the next batch's Leader answers)
        prompts, pair = self._next_pair()
        # 4. preferences p = p(y ≻ y' | x); a failed query is ½, counted, and too many stop the run
        values = self.preference(prompts, pair.leader.texts, pair.follower.texts)
        error_rate = self._preference_error_rate(step, values)
        prefs = torch.tensor([float(v) for v in values], device=self.accelerator.device)  # (B,)
        # 5.-6. log-probabilities of policy and reference, losses, backward per micro-batch
        update_leader = step % cfg.leader_update_every == 0
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.losses.accumulate(pair, prefs, update_leader)  # 0-d tensors
        # 7. clip, schedule the learning rate and step
        if cfg.max_grad_norm is not None:
            params = list(self.params.values())
            if self.mode == "fsdp2":  # the norm over every shard (a DTensor), then clip each
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                norm = self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            stats["grad_norm"] = distributed.local(norm).detach().float()
        factor = cfg.lr_factor(step)  # a function of the step: a resumed run needs no state
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self.optimizer.step()
        self._sync_rollout_weights()
        logged = self._to_host(stats)  # the step's one device-to-host copy
        logged["lr"] = self.base_lrs[0] * factor
        logged["preference_error_rate"] = error_rate  # the same on every process
        elapsed = time.perf_counter() - t0
        return {
            "step": step,
            "leader_update": update_leader,
            **logged,
            "time_s": elapsed,
            "steps_per_s": 1.0 / elapsed,
            "prompts_per_s": b * self.world / elapsed,
        }

    def _draw(self) -> list[Prompt]:
        """This process's slice of the next global batch."""
        b = self.config.batch_size
        return self.sampler.next_batch(b * self.world)[self.rank * b : (self.rank + 1) * b]

    def _next_pair(self) -> tuple[list[Prompt], RolloutPair]:
        """The batch this step trains on, with both roles' answers.

        ``sequential``: draw a batch, sample its Leader answers, then its Follower answers.
        ``one_call``: the batch is the one whose Leader answers the previous step sampled (the
        first step samples them here); one generation call samples its Follower answers and
        the next batch's Leader answers together (docs/algorithm.md)."""
        if self.pending is None:
            prompts = self._draw()
            leader = self._leader_rollout(prompts)
        else:
            prompts, leader = self.pending.prompts, self.pending.leader
            self.pending = None
        ids, offsets = self._follower_prompts(prompts, leader)
        if not self.config.one_call_rollouts:
            follower = self._to_rollout(ids, self._generate("follower", ids))
        else:  # shared weights: one set of weights plays both roles in one call
            upcoming = self._draw()
            upcoming_ids = [self.renderer.encode_role("leader", x, None) for x in upcoming]
            answers = self._generate("follower", ids + upcoming_ids)
            follower = self._to_rollout(ids, answers[: len(ids)])
            self.pending = _Pending(upcoming, self._to_rollout(upcoming_ids, answers[len(ids) :]))
        inside = None if offsets is None else leader_span(leader, follower, offsets)
        return prompts, RolloutPair(leader, follower, inside)

    def sample_pair(self, prompts: list[Prompt]) -> RolloutPair:
        """Leader answers, then Follower answers on them, from the current weights (two
        generation calls; evaluation and the ``sequential`` schedule)."""
        leader = self._leader_rollout(prompts)
        ids, offsets = self._follower_prompts(prompts, leader)
        follower = self._to_rollout(ids, self._generate("follower", ids))
        inside = None if offsets is None else leader_span(leader, follower, offsets)
        return RolloutPair(leader, follower, inside)

    def _leader_rollout(self, prompts: list[Prompt]) -> Rollout:
        ids = [self.renderer.encode_role("leader", x, None) for x in prompts]
        return self._to_rollout(ids, self._generate("leader", ids))

    def _follower_prompts(
        self, prompts: list[Prompt], leader: Rollout
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """``T_F(x, y)`` per row: spliced from the Leader's ids (and the offsets of its
        answers), or rendered from its text where the template does not allow the splice."""

        def render(row: int, text: str) -> list[int]:
            return self.renderer.encode_role("follower", prompts[row], text)

        return follower_prompt_ids(leader, self.follower_tail, render)

    def _to_rollout(self, prompts: list[list[int]], answers: list[list[int]]) -> Rollout:
        return to_rollout(self.tokenizer, self.tokens, prompts, answers, self.accelerator.device)

    def _to_host(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's stats as floats in one copy (averaged over processes first: one
        all-reduce)."""
        values = torch.stack([v.to(self.accelerator.device).float() for v in stats.values()])
        if self.world > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(stats, values.tolist(), strict=True))

    def _preference_error_rate(self, step: int, values: Sequence[float]) -> float:
        """The share of the step's preference queries (all processes) that failed; raises above
        ``max_preference_error_rate`` (models/slhf_models/trainer/console.py)."""
        counts = torch.tensor([len(unscored(values)), len(values)], device=self.accelerator.device)
        if self.world > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        failed, total = (int(c) for c in counts.tolist())
        return preference_error_rate(
            values,
            failed_total=failed,
            queries_total=total,
            limit=self.config.max_preference_error_rate,
            step=step,
        )

    def _sync_rollout_weights(self) -> None:
        if self.vllm is not None:
            self.vllm.sync(self.policy, self.adapters)

    def _generate(self, role: Role, prompts: list[list[int]]) -> list[list[int]]:
        """One generation call with ``role``'s weights: each prompt's answer ids, cut at its
        first stop id."""
        cfg = self.config
        if self.vllm is not None:
            return self.vllm.generate(role, prompts)
        merge = cfg.use_lora and cfg.merge_lora_for_generation and self.mode != "fsdp2"
        with self._as_role(role), weights.merged_lora(self.policy, enabled=merge):
            return generate(
                self.policy,
                self.tokens,
                prompts,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                synced=self.mode == "fsdp2",
            )

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Run ``config.steps`` steps (from a checkpoint with ``resume_from``); return metrics."""
        cfg = self.config
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        main = self.accelerator.is_main_process
        if main:  # the .tmp-step-* folders of a save killed midway (an earlier run's)
            checkpoint.remove_stale_temporaries(out)
        self.accelerator.wait_for_everyone()
        start = 0
        if cfg.resume_from:
            start = self._resume(checkpoint.resolve_checkpoint(cfg.resume_from, out))
        else:  # one sampling stream per process; process 0 uses the seed itself
            torch.manual_seed(cfg.seed + self.rank)
            random.seed(cfg.seed + self.rank)
            np.random.seed(cfg.seed + self.rank)
        history = []
        reporter = MetricsReporter(out, cfg.report_to, start_step=start, active=main)
        console = Console(total=cfg.steps, start=start, log_every=cfg.log_every, active=main)
        with reporter, console:
            for step in range(start + 1, cfg.steps + 1):
                metrics = self._step(step)  # PreferenceFailureError: too many failed queries
                history.append(metrics)
                reporter.log(metrics)
                console.step(metrics)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    scores = self.evaluate(step)
                    reporter.log({"step": step, **scores})
                    console.message(f"eval step {step}: " + _compact(scores))
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save_checkpoint(step)
        if not cfg.save_every or cfg.steps % cfg.save_every:
            self.save_checkpoint(cfg.steps)
        return history

    def evaluate(self, step: int = 0) -> dict[str, float]:
        """Mean p(Follower ≻ Leader) on the eval prompts (see
        models/slhf_models/trainer/evaluation.py)."""
        prompts = self.eval_dataset[self.rank :: self.world]
        pad = 0
        if self.mode == "fsdp2":  # every process samples the same number of batches (lockstep)
            pad = -(-len(self.eval_dataset) // self.world) - len(prompts)
            prompts = prompts + [self.eval_dataset[0]] * pad
        rows = evaluation.follower_vs_leader(
            prompts,
            sample_pair=self.sample_pair,
            preference=self.preference,
            batch_size=self.config.batch_size,
            seed=self.config.seed + 7919 * step + self.rank,
        )
        rows = rows[: len(rows) - pad]
        if self.world > 1:
            rows = gather_object(rows)
        return evaluation.summary(rows)

    def save_checkpoint(self, step: int) -> Path:
        """Write ``output_dir/checkpoints/step-N`` (main process; every process waits for it)."""
        out = Path(self.config.output_dir)
        path = out / checkpoint.CHECKPOINTS / f"step-{step}"
        rngs = gather_object([checkpoint.rng_state()]) if self.world > 1 else None
        pending = [self._pending_state()]
        if self.world > 1:
            pending = gather_object(pending)
        main = self.accelerator.is_main_process
        state = {
            "data_position": self.sampler.position,
            "config_hash": config_hash(self.config),
            "num_processes": self.world,
            "distributed": self.mode,
        }
        if self.mode == "fsdp2":  # every process writes its shards into the main one's folder
            tmp = [checkpoint.temporary_folder(out, step) if main else None]
            broadcast_object_list(tmp, from_process=0)
            folder = Path(str(tmp[0]))
            distributed.save_sharded(
                folder / checkpoint.SHARDED, self.model, self.optimizer, set(self.params)
            )
            self.accelerator.wait_for_everyone()
            if main:
                checkpoint.save_checkpoint(
                    out, step, state=state, process_rngs=rngs, pending=pending, tmp=folder
                )
        elif main:
            checkpoint.save_checkpoint(
                out,
                step,
                params={n: p.detach().clone() for n, p in self.params.items()},
                optimizer=self.optimizer.state_dict(),
                state=state,
                process_rngs=rngs,
                pending=pending,
            )
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self, path: Path) -> int:
        load_shards = None
        if self.mode == "fsdp2":

            def load_shards(folder: Path) -> None:
                distributed.load_sharded(folder, self.model, self.optimizer, set(self.params))

        step, self.sampler.position = checkpoint.restore_checkpoint(
            path,
            self.params,
            self.optimizer,
            rank=self.rank,
            num_processes=self.world,
            mode=self.mode,
            load_shards=load_shards,
        )
        saved = checkpoint.load_pending(path, self.rank)
        if saved is not None:
            self.pending = _Pending(
                saved["prompts"], self._to_rollout(saved["prompt_ids"], saved["answer_ids"])
            )
        self._sync_rollout_weights()
        return step

    def _pending_state(self) -> dict[str, Any] | None:
        if self.pending is None:
            return None
        leader = self.pending.leader
        return {
            "prompts": self.pending.prompts,
            "prompt_ids": leader.prompt_ids(),
            "answer_ids": leader.answer_ids(),
        }

    # -- the trained artefact ----------------------------------------------------------------------
    def save_model(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        merged: bool = False,
        push_to_hub: bool | None = None,
        hub_model_id: str | None = None,
        revision: str | None = None,
    ) -> Path:
        """Write servable weights + tokenizer + ``slhf.json`` + a model card into ``path``
        (atomically; default ``output_dir/final``), and upload it to the Hub when ``push_to_hub``.

        See models/slhf_models/trainer/artefact.py: adapters on a portable reference to the base, or
        with
        ``merged=True`` full weights; full weights in the base model's dtype. The Hub options
        default to the config's ``push_to_hub``/``hub_model_id``/``hub_revision``. Only the
        main process writes and uploads.
        """
        cfg = self.config
        out = Path(path or Path(cfg.output_dir) / "final").absolute()
        push = cfg.push_to_hub if push_to_hub is None else push_to_hub
        repo_id, revision = hub_model_id or cfg.hub_model_id, revision or cfg.hub_revision
        if merged and cfg.follower_weights == "separate_adapter":
            raise ValueError("merged=True needs shared weights; separate adapters cannot merge")
        if push and not repo_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. my-org/my-slhf-model)")
        policy = self.policy
        if self.mode == "fsdp2":  # gathered onto the main process (a collective)
            policy = distributed.unsharded_copy(self.model, self._rebuild)
        if self.accelerator.is_main_process:
            save_artefact(
                out,
                policy,
                self.tokenizer,
                cfg,
                adapters=self.adapters,
                uses_chat=self.renderer.uses_chat,
                merged=merged,
            )
            if push:
                url = artefact.push_to_hub(out, str(repo_id), revision=revision)
                print(f"slhf train: pushed {out} to {url}", file=sys.stderr)
        self.accelerator.wait_for_everyone()
        return out

    def close(self) -> None:
        """End the run: remove the vLLM engine's temporary folders, and under several processes
        (without vLLM, whose engine holds groups of its own until it exits) destroy the process
        group once every process is here; a gloo group left to the interpreter's exit can abort
        it ("terminate called without an active exception")."""
        if self.vllm is not None:
            self.vllm.close()
            return
        if self.world > 1 and torch.distributed.is_initialized():
            self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()

    def _rebuild(self, model_config: Any) -> Any:
        """The policy's architecture, with the same adapters, empty (for ``unsharded_copy``)."""
        from transformers import AutoModelForCausalLM

        dtype = next(iter(self.params.values())).dtype if not self.config.use_lora else None
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype or model_config.dtype)
        return weights.with_lora(model, self.config) if self.config.use_lora else model


# -- helpers ---------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """The next batch (this process's prompts) and its Leader answers, sampled by the previous
    step's generation call (``rollout_schedule`` one_call); checkpoints keep it."""

    prompts: list[Prompt]
    leader: Rollout


def _compact(values: dict[str, float]) -> str:
    return " | ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in values.items())
