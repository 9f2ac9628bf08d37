"""Logic of the benchmark tools (docs/performance.md): the py-spy profile's parser (``bench/
profile_serving.py``), the serving benchmark's ratios (``bench/serving.py``) and the copy-heavy
Follower's training rows (``bench/copy_model.py``)."""

from __future__ import annotations

from typing import Any

from bench import copy_model, profile_serving, serving

API = 'process 10:"python -m slhf.cli serve"'
CORE = 'process 11:"VLLM::EngineCore"'
WORKER = 'process 12:"VLLM::Worker"'
RAW = "\n".join(
    [
        f"{API};Runner.run (asyncio/runners.py:118) 7",
        f"{API};{CORE};run_busy_loop (vllm/v1/engine/core.py:1555);"
        "SpinCondition.wait (shm_broadcast.py:208);sched_yield (vllm/distributed/utils.py:46) 30",
        f"{API};{CORE};{WORKER};execute_model (vllm/v1/worker/cpu_model_runner.py:1);"
        "LlamaForCausalLM.forward (llama.py:1);OpOverload.__call__ (torch/_ops.py:875) 50",
        f"{API};{CORE};{WORKER};acquire_read (shm_broadcast.py:843);"
        "sched_yield (vllm/distributed/utils.py:46) 20",
        f"{API};{CORE};{WORKER};Connection._recv (multiprocessing/connection.py:395) 5",
        "not a sample line",
    ]
)


def test_samples_go_to_the_innermost_process_of_their_ancestry() -> None:
    out = profile_serving.parse_raw(RAW)
    assert {pid: e["samples"] for pid, e in out.items()} == {10: 7, 11: 30, 12: 75}
    assert out[12]["cmdline"] == "VLLM::Worker"


def test_samples_are_split_by_what_the_process_was_doing() -> None:
    out = profile_serving.parse_raw(RAW)
    assert out[11]["by_category"] == {"spin": 30}
    assert out[12]["by_category"] == {"model": 50, "spin": 20, "blocked": 5}
    assert out[10]["by_category"] == {"other": 7}
    assert out[12]["top_leaves"][0] == ("OpOverload.__call__ (torch/_ops.py:875)", 50)


def test_stacks_without_a_process_belong_to_the_given_pid() -> None:
    line = "main (client.py:1);EpollSelector.select (selectors.py:1) 4"
    out = profile_serving.parse_raw(line, 99)
    assert out[99]["samples"] == 4 and out[99]["by_category"] == {"blocked": 4}


def test_the_api_processs_functions_are_shared_by_inclusive_and_self_samples() -> None:
    out = {f["function"]: f for f in profile_serving.api_functions(RAW, 10)}
    # only the API process's own 7 samples count; the line number is dropped
    assert out == {
        "Runner.run (asyncio/runners.py)": {
            "function": "Runner.run (asyncio/runners.py)",
            "inclusive": 1.0,
            "self": 1.0,
        }
    }
    worker = {f["function"]: f for f in profile_serving.api_functions(RAW, 12)}
    assert worker["execute_model (vllm/v1/worker/cpu_model_runner.py)"]["inclusive"] == 0.6667
    assert worker["execute_model (vllm/v1/worker/cpu_model_runner.py)"]["self"] == 0.0
    assert worker["OpOverload.__call__ (torch/_ops.py)"]["self"] == 0.6667
    assert worker["sched_yield (vllm/distributed/utils.py)"]["self"] == 0.2667


def _cell(rps: float, api_cpu_s: float | None, requests: int = 100) -> dict[str, Any]:
    cpu_s = {"client+api": 1.0} if api_cpu_s is None else {"api": api_cpu_s, "client": 0.1}
    return {
        "rounds": 2,
        "concurrency": 32,
        "requests": requests,
        "requests_per_s": rps,
        "p50_ms": 100.0,
        "cpu": {"cpu_s": cpu_s},
    }


def test_serving_ratios_weigh_the_api_processs_cpu_per_chain_against_the_peers() -> None:
    res = {
        "ours": [_cell(60, 0.40), _cell(50, 0.50), _cell(55, 0.45)],  # median 4.5 ms/request
        "peer": [_cell(30, 0.60)],  # 6.0 ms
        "peer_chat": [_cell(20, 0.80)],  # 8.0 ms
        "in_process": [_cell(70, None)],  # no API process of its own
    }
    _, rows = serving.ratios(res)
    cpu = {r["versus"]: r for r in rows if r["metric"] == serving.API_CPU}
    assert set(cpu) == {"peer", "peer_chat"}
    assert abs(cpu["peer"]["ratio"] - 0.75) < 1e-9 and cpu["peer"]["met"] is True  # <= 0.8
    assert abs(cpu["peer_chat"]["ratio"] - 0.5625) < 1e-9 and cpu["peer_chat"]["met"] is True
    res["ours"] = [_cell(60, 0.50)]  # 5.0 ms: 0.83x and 0.625x, both missed
    _, rows = serving.ratios(res)
    assert [r["met"] for r in rows if r["metric"] == serving.API_CPU] == [False, False]


def test_copy_rows_teach_the_follower_to_return_the_given_answer() -> None:
    rows = copy_model.copy_rows(400, seed=0)
    follower = [r for r in rows if "response" in r]
    leader = [r for r in rows if "response" not in r]
    assert len(rows) == 400 and all(r["answer"] == r["response"] for r in follower)
    assert 0.15 < len(leader) / len(rows) < 0.35  # LEADER_SHARE = 0.25
    assert all(r["answer"] and r["prompt"] for r in rows)
    assert copy_model.copy_rows(400, seed=0) == rows  # seeded


def test_the_memory_estimate_counts_the_real_architectures_parameters() -> None:
    """The fit table's model (bench/memory_estimate.py) against the real configs' parameter
    counts (built on the meta device by slhf_models.shapes)."""
    from bench import memory_estimate
    from slhf_models.shapes import parameter_count

    assert memory_estimate.QWEN25_05B.params() == parameter_count("qwen2.5-0.5b") == 494_032_768
    assert memory_estimate.LLAMA31_8B.params() == parameter_count("llama3.1-8b", num_layers=32)
    paper = memory_estimate.estimate(memory_estimate.QWEN25_05B, memory_estimate.Run())
    assert paper["total"] < 80 * 0.95  # the paper's 0.5B defaults fit one 80 GiB GPU (computed)
    no_checkpointing = memory_estimate.Run(gradient_checkpointing=False)
    assert memory_estimate.estimate(memory_estimate.QWEN25_05B, no_checkpointing)["total"] > 40


def test_serving_systems_name_their_options_and_refuse_what_cannot_apply() -> None:
    import argparse

    import pytest

    s = serving.parse_system("ours[nice=3,engine_metrics=off]")
    assert (s.base, s.nice, s.engine_metrics) == ("ours", 3, False)
    assert serving.parse_system(s.name) == s
    assert serving.parse_system("peer_tokens") == serving.System("peer")
    for bad in ("peer[engine_metrics=off]", "peer[nice=1]", "ours[speed=9]", "ours[nice=99]"):
        with pytest.raises(argparse.ArgumentTypeError):
            serving.parse_system(bad)
