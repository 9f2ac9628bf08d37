"""``slhf eval``: win rates of a served SLHF model or a weights folder (models/eval.py).

Each of ``--model``, ``--base`` (the warm-start base) and ``--other`` (a second model family) is
either the base URL of a running SLHF server (``http://host:8000``) or a weights folder, which is
served by ``slhf serve`` on loopback for the run (one server per distinct folder). Answers come
from ``POST /v1/refine``: ``rounds: 0`` for a Leader answer, ``response`` + ``rounds: 1`` for a
Follower round on a given answer. With ``--other-model NAME``, ``--other`` is any
OpenAI-compatible server and its answers come from ``/v1/chat/completions``.

Prompts: ``--task arith`` (held-out split, drawn with ``--seed``) or ``--prompts FILE.jsonl``.
Preference: any of ``slhf train``'s specs (``task:arith``, ``callable:...``, ``reward_model:...``,
``judge:...``); default ``task:<task>``. Writes ``eval.json``, ``eval.md``, ``eval_rounds.png``::

    slhf eval --model out/final --base out/sft --other qwen-folder --task arith \\
        --num-prompts 256 --rounds 4 --seed 0 --out eval-out
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from slhf.models.preferences import Prompt
from slhf.models.tasks import TASKS, task_module

START_TIMEOUT_S = 300


class EvalError(RuntimeError):
    """A model that cannot be served or answers badly; the message names which."""


class ServedGenerator:
    """Leader answers and Follower rounds from an SLHF server's ``/v1/refine``."""

    def __init__(
        self,
        base_url: str,
        *,
        sampling: dict[str, Any],
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 120.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = base_url.rstrip("/").removesuffix("/v1")
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.sampling = sampling
        self.concurrency = concurrency

    def _refine(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(self.url + "/v1/refine", json=body)
        if response.status_code != 200:
            raise EvalError(
                f"{self.url}/v1/refine answered {response.status_code}: {response.text}"
            )
        return dict(response.json())

    def _batch(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._refine, bodies))

    @staticmethod
    def _prompt(prompt: Prompt) -> dict[str, Any]:
        return {"prompt": prompt} if isinstance(prompt, str) else {"messages": list(prompt)}

    def leader(self, prompts: Sequence[Prompt], seed: int) -> list[str]:
        bodies = [
            {**self._prompt(x), "rounds": 0, "seed": seed * 100_000 + i, "leader": self.sampling}
            for i, x in enumerate(prompts)
        ]
        return [r["leader"]["text"] for r in self._batch(bodies)]

    def follow(self, prompts: Sequence[Prompt], answers: Sequence[str], seed: int) -> list[str]:
        bodies = [
            {
                **self._prompt(x),
                "response": y if y.strip() else "…",  # the server refuses an empty response
                "rounds": 1,
                "stop_when_unchanged": False,
                "seed": seed * 100_000 + i,
                "follower": self.sampling,
            }
            for i, (x, y) in enumerate(zip(prompts, answers, strict=True))
        ]
        return [r["rounds"][0]["text"] if r["rounds"] else r["final"] for r in self._batch(bodies)]


class ChatGenerator:
    """Leader-only answers from any OpenAI-compatible ``/v1/chat/completions`` (``--other``)."""

    def __init__(self, base_url: str, model: str, *, sampling: dict[str, Any]) -> None:
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
        self.model = model
        self.sampling = {k: v for k, v in sampling.items() if k != "top_k"}
        self.client = httpx.Client(timeout=120.0)

    def _answer(self, job: tuple[int, Prompt]) -> str:
        i, x = job
        messages = [{"role": "user", "content": x}] if isinstance(x, str) else list(x)
        body = {"model": self.model, "messages": messages, "seed": i, **self.sampling}
        response = self.client.post(self.url, json=body)
        if response.status_code != 200:
            raise EvalError(f"{self.url} answered {response.status_code}: {response.text}")
        return str(response.json()["choices"][0]["message"]["content"] or "")

    def leader(self, prompts: Sequence[Prompt], seed: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(
                pool.map(self._answer, [(seed * 100_000 + i, x) for i, x in enumerate(prompts)])
            )

    def follow(self, prompts: Sequence[Prompt], answers: Sequence[str], seed: int) -> list[str]:
        raise EvalError("an OpenAI-compatible --other model gives answers only; it has no Follower")


# -- serving a weights folder ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_folder(folder: str, log_dir: Path) -> Iterator[str]:
    """Run ``slhf serve --model folder`` on loopback; yield its base URL; stop it on exit."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLHF_")}
    env |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "slhf.cli", "serve", "--model", folder]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_TIMEOUT_S:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise EvalError(f"slhf serve exited with {proc.returncode} (log {log}):\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise EvalError(f"slhf serve not ready after {START_TIMEOUT_S}s (log {log})")


# -- CLI ---------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="SLHF server URL or weights folder to evaluate")
    p.add_argument("--base", help="the warm-start base (URL or folder): leader_vs_base, control")
    p.add_argument("--other", help="a second model family (URL or folder): cross_family")
    p.add_argument("--other-model", help="model id: --other is any OpenAI-compatible server")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", choices=TASKS, help="prompts from the task's held-out split")
    source.add_argument("--prompts", help="prompts file (.jsonl with a 'prompt' field)")
    p.add_argument("--preference", help="preference spec as for slhf train; default task:<task>")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4, help="Follower rounds of the curve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--api-key", default=os.environ.get("SLHF_API_KEY"), help="for served URLs")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output folder")
    p.add_argument(
        "--tau", type=float, nargs=2, metavar=("TAU_L", "TAU_F"),
        help="τL τF of the condorcet tabular twin; default: the recipe in --model's slhf.json",
    )  # fmt: skip


def _load_prompts(args: argparse.Namespace) -> list[Prompt]:
    if args.task:
        return list(task_module(args.task).sample_prompts(args.num_prompts, "test", seed=args.seed))
    from slhf.models.trainer.data import load_prompts

    prompts: list[Prompt] = list(load_prompts(args.prompts))
    return prompts[: args.num_prompts]


def _generators(
    stack: contextlib.ExitStack, specs: dict[str, str | None], args: argparse.Namespace
) -> dict[str, Any]:
    """A generator per given role; each distinct weights folder is served once on loopback."""
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k}
    urls: dict[str, str] = {}  # spec -> URL
    for spec in specs.values():
        if spec and spec not in urls and not (args.other_model and spec == args.other):
            served = spec.startswith(("http://", "https://"))
            logs = args.out / "logs"  # one server log per served folder
            urls[spec] = spec if served else stack.enter_context(serve_folder(spec, logs))
    gens: dict[str, Any] = {
        role: ServedGenerator(urls[spec], sampling=sampling, api_key=args.api_key)
        for role, spec in specs.items()
        if spec and not (role == "other" and args.other_model)
    }
    if args.other and args.other_model:
        gens["other"] = ChatGenerator(args.other, args.other_model, sampling=sampling)
    return gens


def recipe_taus(model: str) -> tuple[float, float] | None:
    """(τL, τF) of the recipe recorded in a weights folder's slhf.json (models/demo.py), if any."""
    import yaml

    from slhf.models.serving.manifest import Manifest, ManifestError

    try:
        recipe = Manifest.load(model).provenance.get("demo", {}).get("recipe")
    except (ManifestError, OSError):
        return None
    config = yaml.safe_load(recipe) if recipe else None
    if not isinstance(config, dict) or "tau_leader" not in config:
        return None
    return float(config["tau_leader"]), float(config["tau_follower"])


def _twin(
    args: argparse.Namespace, prompts: list[Prompt], report: dict[str, Any], gens: dict[str, Any]
) -> dict[str, Any] | None:
    """The condorcet task's tabular twin (models/tasks/condorcet_twin.py), when it applies."""
    if args.task != "condorcet" or "base" not in gens:
        return None
    taus = tuple(args.tau) if args.tau else recipe_taus(args.model)
    if taus is None:
        raise ValueError("the tabular twin needs τL and τF: pass --tau TAU_L TAU_F")
    from slhf.models.tasks.condorcet_twin import twin_report

    answers = report["answers"]
    return twin_report(
        prompts, answers["chain"], answers["base"], gens["model"], gens["base"],
        tau_leader=taus[0], tau_follower=taus[1], seed=args.seed,
    )  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    from slhf.models.eval import evaluate, write_outputs
    from slhf.models.trainer.cli import build_preference
    from slhf.models.trainer.config import ConfigError
    from slhf.models.trainer.data import DataError

    spec = args.preference or (args.task and f"task:{args.task}")
    try:
        prompts = _load_prompts(args)
        preference = build_preference(spec)
    except (ConfigError, DataError, ValueError) as e:
        print(f"slhf eval: {e}", file=sys.stderr)
        return 2
    specs = {"model": args.model, "base": args.base, "other": args.other}
    with contextlib.ExitStack() as stack:
        try:
            gens = _generators(stack, specs, args)
            report = evaluate(
                prompts, gens["model"], preference, rounds=args.rounds, seed=args.seed,
                base=gens.get("base"), other=gens.get("other"), keep_answers=True,
            )  # fmt: skip
            twin = _twin(args, prompts, report, gens)
        except (EvalError, httpx.HTTPError, ValueError) as e:
            print(f"slhf eval: {e}", file=sys.stderr)
            return 1
    del report["answers"]
    if twin is not None:
        report["twin"] = twin
    report |= {"command": _command(), "task": args.task, "preference": spec, "models": specs}
    paths = write_outputs(report, args.out)
    print(paths["markdown"].read_text(), end="")
    for path in paths.values():
        print(path, file=sys.stderr)
    return 0


def _command() -> str:
    """The command line as typed (``slhf eval ...``), so the report can be re-run."""
    args = sys.argv[1:]
    prog = "slhf" if args and args[0] == "eval" else "slhf eval"
    return shlex.join([prog, *args])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slhf eval", description=__doc__.split("\n")[0])
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
