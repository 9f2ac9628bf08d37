"""``StackelbergTrainer``: StackelbergGDA for LLMs (PAPER.md, Algorithm 2).

One set of weights plays both roles through the server's templates (models/templates.py)::

    y_b  ~ π_θ(· | T_L(x_b))            Leader answer
    y'_b ~ π_θ(· | T_F(x_b, y_b))       Follower answer, conditioned on x_b and y_b
    p_b  = p(y_b ≻ y'_b | x_b)          one preference query per prompt
    L_L  = mean_b Σ_t [τL·δ_t − (p_b − ½ − c·1[no EOS])] · log π_θ(y_b,t)
    L_F  = mean_b Σ_t [τF·δ_t − ((1 − p_b) − ½ − c·1[no EOS])] · log π_θ(y'_b,t)
    loss = L_L + κ·L_F      (shared weights; L_L only on every ``leader_update_every``-th step)

With ``follower_weights: separate_adapter`` the roles have their own LoRA adapters on one base
(``leader`` and ``follower``); each adapter gets its own role loss and the Follower's learning
rate is κ·η. "Leader parameters" are then the leader adapter, which changes only on Leader steps;
with shared weights every parameter serves both roles, so ``leader_update_every`` drops L_L from
the loss on the other steps but the shared weights still move with κ·L_F.

The reference π_ref scores the same tokens on the same templates: with LoRA it is the base model
with the adapters disabled (no second copy); in a full fine-tune, the ``ref_model`` passed in.

Departures from the paper's code: log-probabilities are taken at the sampling temperature; with
``gradient_accumulation_steps > 1`` the leave-one-out baseline is computed per micro-batch.

Run::

    slhf train run.yaml steps=100 output_dir=runs/x      # see models/trainer/cli.py
    accelerate launch -m models.trainer.cli run.yaml     # multi-GPU: see the README
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.manifest import Manifest, RoleSpec, SamplingDefaults, TemplateSpec
from models.preferences import Preference
from models.templates import ROLES, Role, TemplateConfig, TemplateRenderer
from models.trainer import checkpoint
from models.trainer.config import StackelbergConfig
from models.trainer.data import Prompt, PromptSampler
from models.trainer.losses import (
    RoleRollout,
    advantages,
    reinforce_loss,
    role_scores,
    stackelberg_loss,
)
from models.trainer.rollouts import Rollout, answer_logprobs, generate

METRICS_FILE = "log.jsonl"
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
    ) -> None:
        if ref_model is None and not config.use_lora:
            raise ValueError("a full fine-tune (use_lora: false) needs a ref_model")
        self.config = config
        self.tokenizer = tokenizer
        self.preference = preference
        self.ref_model = ref_model.eval() if ref_model is not None else None
        self.renderer = TemplateRenderer(
            tokenizer, TemplateConfig(config.follower_instruction, config.template_layout)
        )
        self.sampler = PromptSampler(train_dataset, config.seed)
        torch.manual_seed(config.seed)  # LoRA initialisation
        self.model = self._wrap(model) if config.use_lora else model
        self.model.train()
        self.adapters: dict[Role, str | None] = {"leader": None, "follower": None}
        if config.follower_weights == "separate_adapter":
            self.adapters = {"leader": "leader", "follower": "follower"}
        self.params = self._trainable_params()
        self.optimizer = torch.optim.AdamW(self._param_groups(), weight_decay=0.0)

    # -- setup -----------------------------------------------------------------------------------
    def _wrap(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        targets = cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: floats work
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )
        if cfg.follower_weights == "shared":
            return get_peft_model(model, lora)
        model = get_peft_model(model, lora, adapter_name="leader")
        model.add_adapter("follower", lora)
        return model

    def _trainable_params(self) -> dict[str, torch.nn.Parameter]:
        if not self.config.use_lora:
            return dict(self.model.named_parameters())
        params = {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        for p in params.values():
            p.requires_grad_(True)
        return params

    def _role_params(self, role: Role) -> list[torch.nn.Parameter]:
        return [p for n, p in self.params.items() if f".{role}." in n]

    def _param_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        if cfg.follower_weights == "shared":
            return [{"params": list(self.params.values()), "lr": cfg.learning_rate}]
        return [
            {"params": self._role_params("leader"), "lr": cfg.learning_rate},
            {"params": self._role_params("follower"), "lr": cfg.follower_learning_rate},
        ]

    @contextmanager
    def _as_role(self, role: Role) -> Iterator[None]:
        if self.adapters[role] is not None:
            self.model.set_adapter(self.adapters[role])
        yield

    # -- one step --------------------------------------------------------------------------------
    def _step(self, step: int) -> dict[str, Any]:
        cfg = self.config
        t0 = time.perf_counter()
        # 1. a batch of prompts
        prompts = self.sampler.next_batch(cfg.batch_size)
        # 2. Leader rollouts y ~ π(·|T_L(x))
        leader = self._rollout("leader", [self.renderer.render_leader(x) for x in prompts])
        # 3. Follower rollouts y' ~ π(·|T_F(x, y))
        pairs = zip(prompts, leader.texts, strict=True)
        follower = self._rollout("follower", [self.renderer.render_follower(*p) for p in pairs])
        # 4. preferences p = p(y ≻ y' | x)
        prefs = torch.tensor(self.preference(prompts, leader.texts, follower.texts))  # (B,)
        # 5.-6. log-probabilities of policy and reference, losses, backward per micro-batch
        update_leader = step % cfg.leader_update_every == 0
        self.optimizer.zero_grad(set_to_none=True)
        stats = self._accumulate(leader, follower, prefs.float(), update_leader)
        # 7. clip and step
        if cfg.max_grad_norm is not None:
            params = [p for p in self.params.values() if p.grad is not None]
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        self.optimizer.step()
        elapsed = time.perf_counter() - t0
        return {
            "step": step,
            "leader_update": update_leader,
            **stats,
            "time_s": elapsed,
            "steps_per_s": 1.0 / elapsed,
            "prompts_per_s": cfg.batch_size / elapsed,
        }

    def _rollout(self, role: Role, prompt_texts: list[str]) -> Rollout:
        cfg = self.config
        with self._as_role(role):
            return generate(
                self.model,
                self.tokenizer,
                prompt_texts,
                add_special_tokens=not self.renderer.uses_chat,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
            )

    def _scored(self, role: Role, rollout: Rollout) -> RoleRollout:
        t = self.config.temperature
        with self._as_role(role):
            logprobs = answer_logprobs(self.model, rollout, t)
        with torch.no_grad():
            if self.ref_model is not None:
                ref = answer_logprobs(self.ref_model, rollout, t)
            else:
                with self.model.disable_adapter():
                    ref = answer_logprobs(self.model, rollout, t)
        return RoleRollout(logprobs, ref, rollout.answer_mask, rollout.missing_eos)

    def _accumulate(
        self, leader: Rollout, follower: Rollout, prefs: torch.Tensor, update_leader: bool
    ) -> dict[str, float]:
        cfg = self.config
        n = cfg.gradient_accumulation_steps
        size = cfg.batch_size // n
        totals: dict[str, float] = {}
        for i in range(n):
            rows = slice(i * size, (i + 1) * size)
            lead, foll = self._scored("leader", leader.micro(rows)), None
            if cfg.follower_weights == "shared":
                foll = self._scored("follower", follower.micro(rows))
                loss, stats = stackelberg_loss(
                    lead,
                    foll,
                    prefs[rows],
                    tau_leader=cfg.tau_leader,
                    tau_follower=cfg.tau_follower,
                    kappa=cfg.kappa,
                    estimator=cfg.kl_estimator,
                    baseline=cfg.baseline,
                    missing_eos_penalty=cfg.missing_eos_penalty,
                    update_leader=update_leader,
                )
                (loss / n).backward()
            else:
                stats = self._separate_backward(
                    lead, follower.micro(rows), prefs[rows], n, update_leader
                )
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + float(value) / n
        return _rename(totals)

    def _separate_backward(
        self, lead: RoleRollout, follower: Rollout, prefs: torch.Tensor, n: int, update_leader: bool
    ) -> dict[str, Any]:
        """Role losses on their own adapters; the Follower's κ is in its learning rate."""
        cfg = self.config
        stats: dict[str, Any] = {"preference": prefs.mean()}
        for role in ROLES:
            rollout = lead if role == "leader" else self._scored("follower", follower)
            tau = cfg.tau_leader if role == "leader" else cfg.tau_follower
            scores = role_scores(prefs, rollout.missing_eos, role, cfg.missing_eos_penalty)
            loss, role_stats = reinforce_loss(
                rollout, advantages(scores, cfg.baseline), tau, cfg.kl_estimator
            )
            if role == "follower" or update_leader:
                (loss / n).backward()
                stats["loss"] = stats.get("loss", 0.0) + loss.detach()
            stats |= {f"{role}/{k}": v for k, v in role_stats.items()}
        return stats

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Run ``config.steps`` steps (from a checkpoint with ``resume_from``); return metrics."""
        cfg = self.config
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        start = 0
        if cfg.resume_from:
            start = self._resume(checkpoint.resolve_checkpoint(cfg.resume_from, out))
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
        log_path = out / METRICS_FILE
        _truncate_log(log_path, start)
        history = []
        bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=None)
        with (
            log_path.open("a", encoding="utf-8")
            if cfg.report_to == "jsonl"
            else nullcontext() as log
        ):
            for step in bar:
                metrics = self._step(step)
                history.append(metrics)
                if log is not None:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                if step % cfg.log_every == 0:
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4f}", pref=f"{metrics['preference']:.3f}"
                    )
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save_checkpoint(step)
        if not cfg.save_every or cfg.steps % cfg.save_every:
            self.save_checkpoint(cfg.steps)
        return history

    def save_checkpoint(self, step: int) -> Path:
        return checkpoint.save_checkpoint(
            Path(self.config.output_dir),
            step,
            params={n: p.detach().clone() for n, p in self.params.items()},
            optimizer=self.optimizer.state_dict(),
            state={"data_position": self.sampler.position, "config_hash": config_hash(self.config)},
        )

    def _resume(self, path: Path) -> int:
        ckpt = checkpoint.load_checkpoint(path)
        missing = set(self.params) - set(ckpt["params"])
        if missing:
            raise checkpoint.CheckpointError(
                f"{path}: lacks {len(missing)} trainable parameters (e.g. {sorted(missing)[0]}); "
                "was it written with another use_lora/follower_weights/lora_* setting?"
            )
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(ckpt["params"][name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.sampler.position = ckpt["state"]["data_position"]
        return int(ckpt["state"]["step"])

    # -- the trained artefact ----------------------------------------------------------------------
    def save_model(
        self, path: str | os.PathLike[str] | None = None, *, merged: bool = False
    ) -> Path:
        """Write servable weights + tokenizer + ``slhf.json`` into ``path`` (atomically).

        LoRA runs write the adapters (``adapters/`` when shared, ``adapters/leader`` and
        ``adapters/follower`` when separate) on top of a reference to the base model, or with
        ``merged=True`` full weights with the shared adapter merged in. A full fine-tune writes
        full weights. Default ``path``: ``output_dir/final``.
        """
        cfg = self.config
        out = Path(path or Path(cfg.output_dir) / "final").absolute()
        if merged and cfg.follower_weights == "separate_adapter":
            raise ValueError("merged=True needs shared weights; separate adapters cannot merge")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            roles = self._write_weights(tmp, merged)
            self.tokenizer.save_pretrained(tmp)
            self.manifest(roles, base_model="." if roles["leader"].adapter is None else None).save(
                tmp
            )
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def _write_weights(self, folder: Path, merged: bool) -> dict[Role, RoleSpec]:
        cfg = self.config
        sampling = SamplingDefaults(
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k if cfg.top_k > 0 else -1,
        )
        if not cfg.use_lora or merged:
            model = copy.deepcopy(self.model).merge_and_unload() if cfg.use_lora else self.model
            model.save_pretrained(folder)
            return {r: RoleSpec(sampling=sampling) for r in ROLES}
        self.model.save_pretrained(folder / "adapters")
        adapter = {r: "adapters" if self.adapters[r] is None else f"adapters/{r}" for r in ROLES}
        return {r: RoleSpec(adapter=adapter[r], sampling=sampling) for r in ROLES}

    def manifest(self, roles: dict[Role, RoleSpec], base_model: str | None) -> Manifest:
        cfg = self.config
        base = base_model or cfg.model
        if base_model is None and Path(cfg.model).exists():
            base = str(Path(cfg.model).resolve())
        name = cfg.run_name or Path(cfg.output_dir).name
        return Manifest(
            name=re.sub(r"[^A-Za-z0-9._/-]", "-", name).strip("-./") or "slhf",
            base_model=base,
            leader=roles["leader"],
            follower=roles["follower"],
            template=TemplateSpec(
                layout="chat" if self.renderer.uses_chat else "plain",
                follower_instruction=cfg.follower_instruction,
            ),
            provenance={
                "producer": "slhf train",
                "config_hash": config_hash(cfg),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "steps": cfg.steps,
            },
        )


# -- helpers ---------------------------------------------------------------------------------------
def config_hash(config: StackelbergConfig) -> str:
    """sha256 of the config's settings, for the manifest's provenance."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rename(stats: dict[str, float]) -> dict[str, float]:
    """``leader/kl`` → ``kl/leader`` (metric first, role second), the rest unchanged."""
    out = {}
    for key, value in stats.items():
        role, sep, metric = key.partition("/")
        out[f"{metric}/{role}" if sep and role in ROLES else key] = value
    return out


def _truncate_log(path: Path, step: int) -> None:
    """Drop lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
