"""``slhf game``: solve tabular Stackelberg preference games from the command line.

::

    slhf game solve --preferences P.json --tau-leader 0.5 --tau-follower 0.5 \\
        [--method closed-form|gda|softmax-pg] [--kappa 5] [--lr C]
        [--tol 1e-9] [--max-steps 100000]     (gda: iterate to the tolerance)
        [--steps 3000]                        (softmax-pg: a fixed number of steps)
        -> {"leader": [...], "follower": [[...], ...], "value": v}
           gda adds "steps", "residual", "converged"
    slhf game nash --preferences P.json --tau 0.01
        -> {"policy": [...]}
    slhf game condorcet [--shares 0.4 0.35 0.25] [--tau 0.001] [--rounds 3]
        -> {"preferences", "stackelberg", "nash", "reach": {"slhf", "nash_resampling"}}
    slhf game tokens --model DIR --tau-leader 0.1 --tau-follower 0.1 [--prompt TEXT]
        [--answers A B C] [--shares 0.4 0.35 0.25] [--temperature 1] [--follower-instruction T]
        -> {"answers", "reference", "equilibrium", "value"}

``tokens`` is the single-token Condorcet game of a model (models/slhf_models/token_game.py): the
model's own
next-token distributions are the references, and the closed-form equilibrium over its whole
vocabulary is the target a ``slhf train`` run with ``max_new_tokens: 1`` on that prompt should
reach. It prints, per role, the probabilities of the three answers and of "other".

``P.json`` is a JSON list of lists, ``P[y][y'] = p(y ≻ y')``. Bad input exits with status 2 and
one line on stderr naming the problem and the numbers. ``gda`` and ``softmax-pg`` print their own
answer. ``gda`` (Algorithm 1, step sizes adapted to τ; see models/slhf_models/game_solvers.py) runs
until its
fixed-point residual is below ``--tol``; when ``--max-steps`` run out first it still prints its
answer but exits with status 1 and says so on stderr. ``softmax-pg`` runs ``--steps``; when its
answer is more than 1e-3 (total variation) from the closed form a warning goes to stderr. The parser
is registered by ``slhf.cli`` (the ``slhf`` console script); this module holds the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slhf_models.game import (
    GameError,
    closed_form,
    condorcet_preferences,
    reach_probabilities,
    resampling_kernel,
    total_variation,
)
from slhf_models.game_solvers import nash_equilibrium, softmax_policy_gradient, stackelberg_gda
from slhf_models.serving.templates import DEFAULT_FOLLOWER_INSTRUCTION
from slhf_models.token_game import (
    DEFAULT_ANSWERS,
    DEFAULT_PROMPT,
    DEFAULT_SHARES,
    TokenGameError,
    equilibrium,
    policies,
    summary,
    token_game,
)

METHODS = ("closed-form", "gda", "softmax-pg")
#: softmax-pg answers further than this from the closed form get a warning on stderr.
WARN_TOTAL_VARIATION = 1e-3


def add_game_subcommands(game: argparse.ArgumentParser) -> None:
    """Add ``solve``, ``nash`` and ``condorcet`` under the ``game`` parser."""
    sub = game.add_subparsers(dest="game_command", required=True)
    solve = sub.add_parser("solve", help="Stackelberg equilibrium of a preference matrix")
    solve.add_argument("--preferences", required=True, help="JSON file: list of lists P[y][y']")
    solve.add_argument("--tau-leader", type=float, required=True, help="Leader KL weight τL")
    solve.add_argument("--tau-follower", type=float, required=True, help="Follower KL weight τF")
    solve.add_argument("--method", choices=METHODS, default="closed-form")
    solve.add_argument("--kappa", type=float, default=5.0, help="timescale ratio ηF = κ·ηL")
    solve.add_argument("--steps", type=int, default=3_000, help="iterations of softmax-pg")
    solve.add_argument(
        "--lr", type=float, help="Leader step (gda: scale c of x_i/τ, default 0.05; softmax 0.2)"
    )
    solve.add_argument("--tol", type=float, default=1e-9, help="gda: fixed-point residual to reach")
    solve.add_argument("--max-steps", type=int, default=100_000, help="gda: give up after this")

    nash = sub.add_parser("nash", help="regularised NLHF Nash equilibrium, for comparison")
    nash.add_argument("--preferences", required=True, help="JSON file: list of lists P[y][y']")
    nash.add_argument("--tau", type=float, required=True, help="KL weight τ")

    condorcet = sub.add_parser("condorcet", help="the paper's Condorcet example, SLHF vs NLHF")
    condorcet.add_argument(
        "--shares", type=float, nargs=3, default=[1 / 3, 1 / 3, 1 / 3], metavar="α",
        help="shares of the rankings A≻B≻C, B≻C≻A, C≻A≻B (sum 1)",
    )  # fmt: skip
    condorcet.add_argument("--tau", type=float, default=1e-3, help="τL = τF = τ (NLHF too)")
    condorcet.add_argument("--rounds", type=int, default=3, help="answers in the refinement chain")

    tokens = sub.add_parser("tokens", help="closed form of a model's single-token Condorcet game")
    tokens.add_argument("--model", required=True, help="model folder or HF id (the references)")
    tokens.add_argument("--tau-leader", type=float, required=True, help="Leader KL weight τL")
    tokens.add_argument("--tau-follower", type=float, required=True, help="Follower KL weight τF")
    tokens.add_argument("--prompt", default=DEFAULT_PROMPT, help="the one prompt x")
    tokens.add_argument("--answers", nargs=3, default=list(DEFAULT_ANSWERS), metavar="TOKEN")
    tokens.add_argument(
        "--shares", type=float, nargs=3, default=list(DEFAULT_SHARES), metavar="α",
        help="shares of the rankings A≻B≻C, B≻C≻A, C≻A≻B over --answers (sum 1)",
    )  # fmt: skip
    tokens.add_argument("--temperature", type=float, default=1.0, help="the sampling temperature")
    tokens.add_argument(
        "--follower-instruction", default=DEFAULT_FOLLOWER_INSTRUCTION,
        help="the Follower template's instruction (the run's follower_instruction)",
    )  # fmt: skip


def _load_preferences(path: str) -> object:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise GameError(f"cannot read --preferences {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise GameError(f"--preferences {path} is not valid JSON: {e}") from None


class NotConverged(Exception):
    """gda ran out of --max-steps: the answer is printed, the exit status is 1."""


def _solve(args: argparse.Namespace) -> dict[str, object]:
    p = _load_preferences(args.preferences)
    taus = (args.tau_leader, args.tau_follower)
    oracle = closed_form(p, *taus)
    if args.method == "closed-form":
        return oracle.to_json()
    kwargs: dict[str, float] = {} if args.lr is None else {"lr_leader": args.lr}
    if args.method == "gda":
        sol = stackelberg_gda(
            p, *taus, kappa=args.kappa, tol=args.tol, max_steps=args.max_steps, **kwargs
        )
        if not sol.converged:
            print(json.dumps(sol.to_json()))
            raise NotConverged(
                f"gda did not converge: residual {sol.residual:.3g} after {sol.steps} steps "
                f"(--tol {args.tol:g}); raise --max-steps or --tol"
            )
        return sol.to_json()
    sol = softmax_policy_gradient(p, *taus, kappa=args.kappa, steps=args.steps, **kwargs)
    gap = max(
        total_variation(sol.leader, oracle.leader), total_variation(sol.follower, oracle.follower)
    )
    if gap > WARN_TOTAL_VARIATION:
        print(
            f"slhf game solve: warning: {args.method} after {args.steps} steps is {gap:.2g} "
            "from the closed form (total variation); lower --lr or raise --steps",
            file=sys.stderr,
        )
    return sol.to_json()


def _condorcet(args: argparse.Namespace) -> dict[str, object]:
    if args.rounds < 1:
        raise GameError(f"--rounds must be ≥ 1; got {args.rounds}")
    p = condorcet_preferences(args.shares)
    slhf = closed_form(p, args.tau, args.tau)
    nash = nash_equilibrium(p, args.tau)
    favourites = [0, 1, 2]
    return {
        "preferences": p.tolist(),
        "stackelberg": slhf.to_json(),
        "nash": nash.tolist(),
        "reach": {
            "slhf": reach_probabilities(
                slhf.leader, slhf.follower, favourites, args.shares, args.rounds
            ).tolist(),
            "nash_resampling": reach_probabilities(
                nash, resampling_kernel(nash), favourites, args.shares, args.rounds
            ).tolist(),
        },
    }


def _tokens(args: argparse.Namespace) -> dict[str, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slhf_models.serving.templates import TemplateConfig, TemplateRenderer

    if not args.temperature > 0:
        raise GameError(f"--temperature must be > 0; got {args.temperature}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    try:
        game = token_game(tokenizer, model.config.vocab_size, args.answers, args.shares)
    except TokenGameError as e:
        raise GameError(str(e)) from None
    renderer = TemplateRenderer(tokenizer, TemplateConfig(args.follower_instruction))
    refs = policies(model, tokenizer, renderer, args.prompt, temperature=args.temperature)
    target = equilibrium(game, refs, args.tau_leader, args.tau_follower)
    return {
        "answers": dict(zip(game.answer_texts, game.answer_ids, strict=True)),
        "reference": summary(game, *refs),
        "equilibrium": summary(game, target.leader, target.follower),
        "value": target.value,
    }


def run_game(args: argparse.Namespace) -> int:
    """Run ``slhf game <command>``; print JSON on stdout, or one line on stderr and return 2."""
    try:
        if args.game_command == "solve":
            out = _solve(args)
        elif args.game_command == "tokens":
            out = _tokens(args)
        elif args.game_command == "nash":
            policy = nash_equilibrium(_load_preferences(args.preferences), args.tau)
            out = {"policy": policy.tolist()}
        else:
            out = _condorcet(args)
    except GameError as e:
        print(f"slhf game {args.game_command}: {e}", file=sys.stderr)
        return 2
    except NotConverged as e:
        print(f"slhf game {args.game_command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0
