"""Compare bilevel-RL hyper-gradients with the truth on one seeded tabular soft MDP; print a markdown table.

The truth is a central finite difference of the exact hyper-objective F(φ) = E_{τ1,τ2 ~ π*_φ}[BCE] (all fragment
pairs enumerated, π*_φ the soft-optimal policy). Each other row is one method's gradient at the same φ, computed
exactly in expectation by `agents.exact.tabular_bilevel`:

- M-SoBiRL's closed form (9) and SoBiRL's practical one-step-truncated estimator (arXiv 2405.19697);
- PARL's implicit-function hyper-gradient (Chakraborty et al., ICLR 2024), with the pseudo-inverse of the singular
  lower-level Hessian and with a damped solve;
- the first-order penalty gradient at several σ: the form of Kwon et al. and PBRL (Shen, Yang & Chen, ICML 2024),
  upper loss at the penalised policy, and the form printed in Gaur et al. 2024, upper loss at the lower optimum.

    python sobirl/tabular_compare.py                      # S=3, A=2, d=4, H=2, γ=0.5, τ=0.7, seed 0
    python sobirl/tabular_compare.py --gamma 0.9 --seed 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from agents.exact.tabular_bilevel import (
    central_difference,
    cosine_similarity,
    enumerate_fragments,
    explicit_gradient,
    hyper_objective,
    make_instance,
    msobirl_closed_form,
    parl_hypergradient,
    penalty_gradient,
    relative_error,
    sobirl_practical_gradient,
    soft_optimal,
)
from agents.infra.cli import OneLineErrorParser

MAX_FRAGMENTS = 1500  # (S·A)^H; the pair matrix has this many squared entries


def build_parser() -> argparse.ArgumentParser:
    # bad input: one line on stderr naming the flag, exit status 2
    parser = OneLineErrorParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the instance (MDP, features, φ, labeller)")
    parser.add_argument("--num-states", type=int, default=3, help="number of states S")
    parser.add_argument("--num-actions", type=int, default=2, help="number of actions A")
    parser.add_argument("--num-features", type=int, default=4, help="dimension d of the reward parameter φ")
    parser.add_argument("--horizon", type=int, default=2, help="fragment length H")
    parser.add_argument("--gamma", type=float, default=0.5, help="lower-level discount, in [0, 1)")
    parser.add_argument("--tau", type=float, default=0.7, help="entropy temperature τ (SAC's α)")
    parser.add_argument("--fd-step", type=float, default=1e-5, help="step of the central finite differences")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("num_states", "num_actions", "num_features", "horizon"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.gamma < 1.0:
        parser.error(f"--gamma must be in [0, 1), got {args.gamma}")
    if not args.tau > 0:
        parser.error(f"--tau must be positive, got {args.tau}")
    if not args.fd_step > 0:
        parser.error(f"--fd-step must be positive, got {args.fd_step}")
    fragments = (args.num_states * args.num_actions) ** args.horizon
    if fragments > MAX_FRAGMENTS:
        parser.error(f"(S·A)^H = {fragments} fragments is too many to enumerate pairs of (at most {MAX_FRAGMENTS})")


def compare(args: argparse.Namespace) -> list[tuple[str, torch.Tensor]]:
    """(name, gradient) rows, the finite-difference truth first."""
    inst = make_instance(args.num_states, args.num_actions, args.num_features, args.gamma, args.tau, args.seed)
    frags = enumerate_fragments(inst, args.horizon)
    phi = inst.phi
    _, _, pi_star = soft_optimal(inst, phi)
    rows = [
        (
            "finite differences (truth)",
            central_difference(lambda x: hyper_objective(x, inst, frags), phi, args.fd_step),
        ),
        ("M-SoBiRL closed form (9)", msobirl_closed_form(phi, inst, frags)),
        ("SoBiRL practical (one-step truncation)", sobirl_practical_gradient(phi, inst, frags)),
        ("BCE term only (DRLHF, no implicit term)", explicit_gradient(phi, pi_star, inst, frags)),
        ("PARL, pseudo-inverse Hessian", parl_hypergradient(phi, inst, frags, "pinv")),
        ("PARL, damping λ = 1e-2", parl_hypergradient(phi, inst, frags, "damped", damping=1e-2)),
    ]
    for sigma in (0.1, 0.01, 0.001):
        rows.append(
            (f"penalty σ = {sigma:g} (Kwon / PBRL: ℓ at λ'_σ)", penalty_gradient(phi, sigma, inst, frags, "kwon"))
        )
    rows.append(("penalty σ = 0.01 (Gaur et al. eq. 11: ℓ at λ*)", penalty_gradient(phi, 0.01, inst, frags, "seed")))
    return rows


def markdown_table(rows: list[tuple[str, torch.Tensor]]) -> str:
    truth = rows[0][1]
    lines = ["| method | ‖g − g_true‖ / ‖g_true‖ | cosine to g_true |", "|---|---:|---:|"]
    for name, g in rows:
        lines.append(f"| {name} | {relative_error(g, truth):.3e} | {cosine_similarity(g, truth):.9f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    table = markdown_table(compare(args))
    print(
        f"S={args.num_states} A={args.num_actions} d={args.num_features} H={args.horizon} "
        f"γ={args.gamma:g} τ={args.tau:g} seed={args.seed}, finite-difference step {args.fd_step:g}\n"
    )
    print(table)
    return table


if __name__ == "__main__":
    torch.set_num_threads(1)  # tensors of a few dozen entries: threads only add overhead
    main(sys.argv[1:])
