"""``slhf eval``: win rates of a served SLHF model or a weights folder (models/slhf_models/eval.py).

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
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from slhf.launcher import ServerProcess, ServerStartError, clean_env, free_port
from slhf_client import Client, SLHFClientError
from slhf_models.serving.templates import Prompt
from slhf_models.tasks import TASKS, task_module


class EvalError(RuntimeError):
    """A model that cannot be served or answers badly; the message names which."""


def _parallel(fn: Callable[[int], str], n: int, workers: int, where: str) -> list[str]:
    """``[fn(0), ..., fn(n - 1)]``, up to ``workers`` requests in flight (one shared client); a
    failed request is an ``EvalError`` naming ``where`` it went."""
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, range(n)))
    except SLHFClientError as e:
        raise EvalError(f"{where}: {e}") from e


class ServedGenerator:
    """Leader answers and Follower rounds from an SLHF server's ``/v1/refine`` (``slhf_client``)."""

    def __init__(
        self,
        base_url: str,
        *,
        sampling: dict[str, Any],
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 120.0,
    ) -> None:
        self.client = Client(base_url, api_key, timeout=timeout_s)
        self.url = self.client.base_url
        self.sampling = sampling
        self.concurrency = concurrency

    def leader(self, prompts: Sequence[Prompt], seed: int) -> list[str]:
        def answer(i: int) -> str:
            r = self.client.refine(
                prompts[i], rounds=0, seed=seed * 100_000 + i, leader=self.sampling
            )
            return r.leader.text

        return _parallel(answer, len(prompts), self.concurrency, self.url + "/v1/refine")

    def follow(self, prompts: Sequence[Prompt], answers: Sequence[str], seed: int) -> list[str]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")

        def refine(i: int) -> str:
            r = self.client.refine(
                prompts[i],
                response=answers[i] if answers[i].strip() else "…",  # "" is refused
                rounds=1,
                stop_when_unchanged=False,
                seed=seed * 100_000 + i,
                follower=self.sampling,
            )
            return r.rounds[0].text if r.rounds else r.final

        return _parallel(refine, len(prompts), self.concurrency, self.url + "/v1/refine")


class ChatGenerator:
    """Leader-only answers from any OpenAI-compatible ``/v1/chat/completions`` (``--other``)."""

    def __init__(self, base_url: str, model: str, *, sampling: dict[str, Any]) -> None:
        self.client = Client(base_url, timeout=120.0)
        self.client.api_key = None  # not SLHF_API_KEY: this server is not necessarily ours
        self.url = self.client.base_url + "/v1/chat/completions"
        self.model = model
        self.max_tokens = int(sampling["max_tokens"])
        self.temperature = float(sampling["temperature"])  # top_k is not an OpenAI parameter

    def leader(self, prompts: Sequence[Prompt], seed: int) -> list[str]:
        def answer(i: int) -> str:
            return self.client.chat(
                prompts[i],
                model=self.model,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                seed=seed * 100_000 + i,
            ).content

        return _parallel(answer, len(prompts), 16, self.url)

    def follow(self, prompts: Sequence[Prompt], answers: Sequence[str], seed: int) -> list[str]:
        raise EvalError("an OpenAI-compatible --other model gives answers only; it has no Follower")


# -- serving a weights folder ------------------------------------------------------------------
def serve_folder(folder: str, log_dir: Path) -> ServerProcess:
    """``slhf serve --model folder`` on loopback, ready (``slhf.launcher``); a context
    manager that stops it. Its log is ``log_dir/serve-PORT.log``."""
    env = clean_env(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TOKENIZERS_PARALLELISM="false",
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    )
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    return ServerProcess.start(log, args=["--model", folder], env=env, port=port)


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
    from slhf_models.trainer.data import load_prompts

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
            urls[spec] = spec if served else stack.enter_context(serve_folder(spec, logs)).url
    gens: dict[str, Any] = {
        role: ServedGenerator(urls[spec], sampling=sampling, api_key=args.api_key)
        for role, spec in specs.items()
        if spec and not (role == "other" and args.other_model)
    }
    if args.other and args.other_model:
        gens["other"] = ChatGenerator(args.other, args.other_model, sampling=sampling)
    return gens


def recipe_taus(model: str) -> tuple[float, float] | None:
    """(τL, τF) of the recipe recorded in a weights folder's slhf.json (models/slhf_models/demo.py),
    if any."""
    import yaml

    from slhf_models.serving.manifest import Manifest, ManifestError

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
    """The condorcet task's tabular twin (models/slhf_models/tasks/condorcet_twin.py), when it
    applies."""
    if args.task != "condorcet" or "base" not in gens:
        return None
    taus = tuple(args.tau) if args.tau else recipe_taus(args.model)
    if taus is None:
        raise ValueError("the tabular twin needs τL and τF: pass --tau TAU_L TAU_F")
    from slhf_models.tasks.condorcet_twin import twin_report

    answers = report["answers"]
    return twin_report(
        prompts, answers["chain"], answers["base"], gens["model"], gens["base"],
        tau_leader=taus[0], tau_follower=taus[1], seed=args.seed,
    )  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    from slhf_models.eval import evaluate, write_outputs
    from slhf_models.trainer.cli import build_preference
    from slhf_models.trainer.config import ConfigError
    from slhf_models.trainer.data import DataError

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
        except (EvalError, ServerStartError, ValueError) as e:
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
