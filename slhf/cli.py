"""``slhf`` command line: ``slhf serve``, ``batch``, ``game``, ``train``, ``eval``, ``refine``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the refinement server (settings from SLHF_* env vars)",
        description="slhf serve [MODEL] [flags]: flags override the SLHF_* environment "
        "variables; the engine flags are those of `vllm serve`.",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="model folder or HF id (SLHF_MODEL); default: the shipped model",
    )
    p.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same as MODEL")
    _settings_arguments(p)
    p.add_argument("--host", help="bind address (SLHF_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (SLHF_PORT, default 8000)")
    p.add_argument(
        "--api-key",
        dest="api_keys",
        metavar="KEY",
        help="required API key; several comma-separated (SLHF_API_KEYS)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["json", "text"], help="SLHF_LOG_FORMAT")
    p.add_argument(
        "--api-servers",
        type=int,
        metavar="N",
        help="API processes sharing the engine (SLHF_API_SERVERS, default 1)",
    )
    p.add_argument(
        "--help-engine",
        action="store_true",
        help="list vLLM's engine flags, which slhf serve also takes (SLHF_ENGINE_ARGS)",
    )


def _settings_arguments(p: argparse.ArgumentParser) -> None:
    """The settings flags ``slhf serve`` and ``slhf batch`` share (besides vLLM's engine flags)."""
    p.add_argument("--follower-model", help="separate Follower model (SLHF_FOLLOWER_MODEL)")
    p.add_argument("--served-model-name", help="model id in the API (SLHF_SERVED_MODEL_NAME)")
    p.add_argument("--topology", choices=["auto", "shared", "lora", "separate"])
    p.add_argument(
        "--max-rounds", type=int, help="largest rounds a request may ask (SLHF_MAX_ROUNDS)"
    )
    p.add_argument("--max-model-len", type=int, help="context length (SLHF_MAX_MODEL_LEN)")
    p.add_argument(
        "--tensor-parallel-size", type=int, help="GPUs per engine (SLHF_TENSOR_PARALLEL_SIZE)"
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="share of GPU memory for the engine(s) (SLHF_GPU_MEMORY_UTILIZATION)",
    )
    p.add_argument("--dtype", help="weights dtype: auto, bfloat16, float16, ... (SLHF_DTYPE)")


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line sets (over the environment's), by settings field name:
    slhf's flags, then vLLM's engine flags (``args.engine_fields``, server/slhf_server/
    engine_flags.py) routed to the slhf setting of the same meaning or to ``engine_args``."""
    from slhf_server.engine_flags import route

    skip = {"command", "engine_fields", "help_engine"}
    given = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    as_settings, engine_args = route(getattr(args, "engine_fields", {}) or {})
    for field, value in as_settings.items():
        name = "model_flag" if field == "model" else field
        if name in given and given[name] != value:
            raise ValueError(f"{field} given twice: {given[name]!r} and {value!r}")
        given[name] = value
    if engine_args:
        given["engine_args"] = engine_args
    flag = given.pop("model_flag", None)
    if flag is not None and given.get("model", flag) != flag:
        raise ValueError(f"two models given: {given['model']} and --model {flag}")
    if flag is not None:
        given["model"] = flag
    return given


def serve(args: argparse.Namespace) -> int:
    """Check the settings, the weights and the port (each failure: one line, exit 2), then load
    the engine and serve; uvicorn listens on the socket bound here once the model is loaded.
    With ``SLHF_API_SERVERS`` > 1 this process supervises that many API processes on one engine
    (server/slhf_server/api_servers.py)."""
    from slhf_server.settings import ServerSettings

    try:
        settings = ServerSettings(**serve_overrides(args))
    except ValueError as e:  # pydantic's ValidationError is a ValueError (EngineFlagError too)
        print(f"slhf serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    metrics_dir = None
    if settings.api_servers > 1:  # before the imports below bring in prometheus_client
        from slhf_server.api_servers import use_metrics_dir

        metrics_dir = use_metrics_dir()

    from slhf_models.serving.manifest import ManifestError
    from slhf_server import log_pipe
    from slhf_server.app import create_app, resolve_served_weights, run_app
    from slhf_server.lifecycle import exit_process
    from slhf_server.logs import configure_logging
    from slhf_server.preflight import (
        StartupError,
        bind_socket,
        check_api_servers,
        check_block_size,
        check_drafting,
        check_weights,
        vllm_cpu_build,
    )
    from slhf_server.tracing import check_tracing

    try:
        weights = resolve_served_weights(settings)
    except ManifestError as e:
        print(f"slhf serve: cannot serve the model: {e}", file=sys.stderr)
        return 2
    try:
        check_weights(weights)
        cpu = vllm_cpu_build()
        check_block_size(settings.kv_block_size, cpu=cpu)
        check_drafting(settings.speculative, cpu=cpu)
        check_tracing(settings)
        check_api_servers(settings.api_servers, weights.topology)
        sock = bind_socket(settings.host, settings.port)
    except StartupError as e:
        print(f"slhf serve: {e}", file=sys.stderr)
        if metrics_dir is not None:
            os.rmdir(metrics_dir)
        return 2
    if settings.log_format == "json":
        # From here every line is JSON, whoever writes it (server/slhf_server/log_pipe.py); the
        # one-line
        # startup errors above stay plain for the person who typed the command.
        log_pipe.install()
    log_config = configure_logging(settings.log_format, settings.log_level)
    if metrics_dir is not None:
        from slhf_server import api_servers

        api_servers.serve(settings, weights, sock, metrics_dir)
    started = run_app(create_app(settings, weights=weights), settings, log_config, sock)
    # The app's teardown is done (engine stopped): end now, without the interpreter's teardown
    # (docs/reliability.md, "Shutdown"). 3 = the app never started (as uvicorn.run).
    exit_process(0 if started else 3)
    return 0


def _batch_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slhf.batch import add_batch_arguments

    p = sub.add_parser(
        "batch",
        help="answer a whole JSONL batch file offline on an in-process engine (resumable)",
        description="slhf batch INPUT.jsonl -o OUTPUT.jsonl [flags]: the OpenAI Batch file "
        "format; the settings flags and vLLM's engine flags are those of `slhf serve` "
        "(docs/batch.md).",
    )
    add_batch_arguments(p)
    p.add_argument("--model", dest="model_flag", metavar="MODEL", help="model folder or HF id")
    _settings_arguments(p)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["json", "text"], help="SLHF_LOG_FORMAT")


def batch(args: argparse.Namespace) -> int:
    from slhf.batch import BATCH_ONLY, run

    settings_args = argparse.Namespace(
        **{k: v for k, v in vars(args).items() if k not in BATCH_ONLY}
    )
    try:
        overrides = serve_overrides(settings_args)
    except ValueError as e:
        print(f"slhf batch: invalid settings:\n{e}", file=sys.stderr)
        return 2
    return run(args, overrides)


def _game_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slhf_models.game_cli import add_game_subcommands

    p = sub.add_parser(
        "game",
        help="solve tabular Stackelberg preference games (closed form, GDA, NLHF, Condorcet)",
        description="Prints JSON on stdout; bad input exits with status 2.",
    )
    add_game_subcommands(p)


def game(args: argparse.Namespace) -> int:
    from slhf_models.game_cli import run_game

    return run_game(args)


def _train_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slhf_models.trainer.cli import add_train_arguments

    p = sub.add_parser(
        "train",
        help="train a Leader/Follower with StackelbergGDA (CONFIG.yaml [key=value ...])",
        description="Writes checkpoints, log.jsonl and output_dir/final with its slhf.json.",
    )
    add_train_arguments(p)


def train(args: argparse.Namespace) -> int:
    from slhf_models.trainer.cli import run_train

    return run_train(args)


def _eval_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slhf.eval_cli import add_eval_arguments

    p = sub.add_parser(
        "eval",
        help="win rates with 95%% CIs: Leader vs base, Follower vs Leader, rounds, cross-family",
        description="Writes eval.json, eval.md and eval_rounds.png to --out.",
    )
    add_eval_arguments(p)


def evaluate(args: argparse.Namespace) -> int:
    from slhf.eval_cli import run_eval

    return run_eval(args)


def _refine_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slhf_client.cli import add_refine_arguments  # the client package: httpx only

    p = sub.add_parser(
        "refine",
        help="ask a running server for a refined answer; show every round and what changed",
        description="Server from --url or SLHF_BASE_URL, key from --api-key or SLHF_API_KEY.",
    )
    add_refine_arguments(p)


def refine(args: argparse.Namespace) -> int:
    from slhf_client.cli import run_refine

    return run_refine(args)


def _engine_flags_first(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``slhf serve`` (or ``batch``) with flags slhf does not know: vLLM's engine parser takes
    its flags first (they take values, which slhf's parser would read as the model), slhf's
    parser the rest.
    Importing vLLM prints; with JSON logs the pipe goes in first, so those lines are JSON too."""
    import os

    json_logs = os.environ.get("SLHF_LOG_FORMAT", "").lower() == "json"
    if "--log-format" in argv:
        json_logs = argv[argv.index("--log-format") + 1 :][:1] == ["json"]
    if json_logs or "--log-format=json" in argv:
        from slhf_server import log_pipe

        log_pipe.install()
    from slhf_server.engine_flags import split_serve_argv

    fields, rest = split_serve_argv(argv[1:])
    return fields, [argv[0], *rest]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slhf", description="SLHF refinement server and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _batch_parser(sub)
    _game_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _refine_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    engine_fields: dict[str, Any] = {}
    if argv[:1] in (["serve"], ["batch"]) and parser.parse_known_args(argv)[1]:
        engine_fields, argv = _engine_flags_first(argv)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.help_engine:
            from slhf_server.engine_flags import engine_parser

            engine_parser().print_help()
            return 0
        args.engine_fields = engine_fields
        return serve(args)
    if args.command == "batch":
        args.engine_fields = engine_fields
        return batch(args)
    if args.command == "game":
        return game(args)
    if args.command == "train":
        return train(args)
    if args.command == "eval":
        return evaluate(args)
    if args.command == "refine":
        return refine(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
