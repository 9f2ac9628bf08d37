"""OpenAI surface costs, against a real ``slhf serve`` process on the random tiny model.

Measures, in one run, at concurrency 1 (sequential requests), with identical seeds and early stop
off (so every side generates the same tokens):
1. streaming: time to the first content token of the final round (TTFT) of a streamed k-round
   ``/v1/chat/completions`` vs the total latency of the same request not streamed. Earlier rounds
   are computed before the final one streams, so TTFT/total is expected near k/(k+1) plus one
   token's worth;
2. the cost of k rounds through ``/v1/chat/completions`` vs ``/v1/refine`` (ratio 1.00 = equal).

Run: ``.venv/bin/python bench/openai_stream.py [--requests 20]``.
Writes ``bench/results/openai_stream.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import httpx

from bench.common import PROMPTS as ALL_PROMPTS
from bench.common import REPO, start_slhf

PROMPTS = ALL_PROMPTS[:4]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def chat_body(i: int, k: int, max_tokens: int, stream: bool) -> dict:
    return {
        "model": "",  # filled in by the caller
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "seed": 1000 + i,
        "stream": stream,
        "refinement": {"rounds": k, "stop_when_unchanged": False},
    }


def refine_body(i: int, k: int, max_tokens: int) -> dict:
    sp = {"max_tokens": max_tokens}
    return {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "rounds": k,
        "seed": 1000 + i,
        "stop_when_unchanged": False,
        "leader": sp,
        "follower": sp,
    }


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def stream_ttft(client: httpx.Client, body: dict) -> tuple[float, float]:
    """(ms to the first content chunk, ms to [DONE]) of one streamed chat completion."""
    t0 = time.perf_counter()
    ttft = None
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            has_text = '"content":"' in line and '"content":""' not in line
            if ttft is None and line.startswith("data: {") and has_text:
                ttft = (time.perf_counter() - t0) * 1000
    total = (time.perf_counter() - t0) * 1000
    return (ttft if ttft is not None else total), total


def measure(client: httpx.Client, args: argparse.Namespace, name: str) -> dict:
    out: dict = {"streaming": {}, "chat_vs_refine": {}}
    for i in range(args.warmup):
        client.post("/v1/chat/completions", json={**chat_body(i, 1, 8, False), "model": name})
    for k in args.rounds:
        plain, ttft, stream_total, chat, refine = [], [], [], [], []
        for i in range(args.requests):
            body = {**chat_body(i, k, args.max_tokens, False), "model": name}
            rb = refine_body(i, k, args.max_tokens)

            # The three calls of one i generate the same tokens, so whichever runs first pays the
            # prefill and the others hit vLLM's prefix cache: rotate the order so each kind goes
            # first equally often.
            kinds = ["plain", "stream", "refine"]
            for kind in kinds[i % 3 :] + kinds[: i % 3]:
                if kind == "plain":
                    plain.append(timed(lambda b=body: client.post("/v1/chat/completions", json=b)))
                elif kind == "stream":
                    first, total = stream_ttft(client, {**body, "stream": True})
                    ttft.append(first)
                    stream_total.append(total)
                else:
                    refine.append(timed(lambda b=rb: client.post("/v1/refine", json=b)))
            chat.append(plain[-1])
        out["streaming"][k] = {
            "non_streamed_total_ms": median(plain),
            "stream_ttft_final_round_ms": median(ttft),
            "stream_total_ms": median(stream_total),
            "ttft_over_total": median(ttft) / median(plain),
            "expected_about": k / (k + 1),
        }
        out["chat_vs_refine"][k] = {
            "chat_ms": median(chat),
            "refine_ms": median(refine),
            "ratio": median(chat) / median(refine),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=21, help="requests per k (sequential)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    args = ap.parse_args()

    with (
        start_slhf(SLHF_MAX_MODEL_LEN=str(args.max_model_len)) as server,
        httpx.Client(base_url=server.url, timeout=300) as client,
    ):
        name = client.get("/v1/models").json()["data"][0]["id"]
        result = measure(client, args, name)

    print(f"model {name}; {args.requests} requests per k; medians; max_tokens {args.max_tokens}")
    print(" k | non-streamed ms | stream TTFT(final) ms | TTFT/total | ~k/(k+1) | chat/refine")
    for k in args.rounds:
        s, c = result["streaming"][k], result["chat_vs_refine"][k]
        print(
            f"{k:2d} | {s['non_streamed_total_ms']:15.1f} | {s['stream_ttft_final_round_ms']:20.1f}"
            f" | {s['ttft_over_total']:10.2f} | {s['expected_about']:8.2f} | {c['ratio']:.3f}"
        )
    result.update(
        model=name,
        requests=args.requests,
        max_tokens=args.max_tokens,
        machine={"platform": platform.platform(), "cpus": os.cpu_count()},
    )
    out = REPO / "bench" / "results" / "openai_stream.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
