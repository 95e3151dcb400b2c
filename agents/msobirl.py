"""M-SoBiRL (model-based soft bilevel RL, Algorithm 1 of arXiv 2405.19697) on tabular random MDPs.

Bilevel problem:   min_x  f(x, π*_x)   where   π*_x is the entropy-regularized (temperature τ) optimal policy
of the MDP with transitions P and reward r_x. The hyper-gradient has the closed form (9) (see
docs/algorithms.md §7); Algorithm 1 follows it inexactly, amortizing both the lower-level solve
(N warm-started soft Bellman sweeps per outer step) and the linear solve (one gradient step on a
least-squares variable w per outer step).

    python agents/msobirl.py                  # the authors' synthetic experiment: S=10, A=5, n=100, K=3000
    python agents/msobirl.py --plot curve.png # also save the convergence plot

Shapes: P is (S, A, S) with P[s, a, s'] = P(s' | s, a); rewards, Q and π are (S, A); V and w are (S,).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agents.exact.soft_mdp import (
    RewardFn,
    least_squares_matrix,
    least_squares_rhs,
    reward_vjp,
    soft_q,
    soft_value,
    soft_value_iteration,
    upper_level_gradients,
)
from agents.infra.cli import (
    flag,
    hyperparameter_table,
    make_run_name,
    parse_args,
    require,
    require_folder_name,
    require_positive,
    run_cli,
)
from agents.infra.run import limit_cpu_threads, pick_device

DESCRIPTION = "M-SoBiRL (Algorithm 1) on the authors' synthetic random-MDP bilevel problem."


@dataclass
class Args:
    exp_name: str = flag("msobirl", "the name of this experiment (part of the run name)")
    seed: int = flag(1, "seed of the experiment: determines the MDP, x_0 and w_0 entirely")
    cuda: bool = flag(True, "use CUDA when it is available")
    runs_dir: str = flag("runs", "directory that receives the TensorBoard run folder")
    plot: str = flag("", "if non-empty, save a PNG of f - S/(2A) and the hyper-gradient norm to this path")

    # the random MDP (the authors' SyntheticProblem)
    num_states: int = flag(10, "number of states S")
    num_actions: int = flag(5, "number of actions A")
    x_dim: int = flag(100, "dimension n of the upper-level variable x (the reward parameters)")
    gamma: float = flag(0.5, "discount factor, in [0, 1)")
    tau: float = flag(1.0, "entropy temperature of the lower-level MDP")

    # Algorithm 1
    iterations: int = flag(3000, "number K of outer iterations")
    beta: float = flag(8e-3, "step size of the hyper-gradient step on x")
    xi: float = flag(0.5, "step size of the gradient step on the least-squares variable w")
    inner_iterations: int = flag(10, "maximum number N of warm-started soft Bellman sweeps per outer iteration")
    inner_tol: float = flag(1e-6, "stop the inner sweeps early once the sup-norm change of V falls below this")


# ---------------------------------------------------------------------------------------------------------
# The synthetic instance
# ---------------------------------------------------------------------------------------------------------


class RandomMDP(NamedTuple):
    P: torch.Tensor  # (S, A, S) transitions
    c: torch.Tensor  # (S, A) reward coefficients
    M: torch.Tensor  # (n, n) reward matrix
    x0: torch.Tensor  # (n,) initial upper-level variable


def make_random_mdp(num_states: int, num_actions: int, x_dim: int, generator: torch.Generator) -> RandomMDP:
    """Draw the authors' random instance from `generator` (CPU, float64), in a fixed order.

    Each (s, a) moves to a uniform random subset of U{1, ..., S-1} states with normalized uniform weights, so the
    chain is sparse: no state-action pair reaches every state in one step.
    """
    S, A, n = num_states, num_actions, x_dim
    P = torch.zeros(S, A, S, dtype=torch.float64)
    max_support = max(S - 1, 1)
    for s in range(S):
        for a in range(A):
            k = int(torch.randint(1, max_support + 1, (1,), generator=generator))
            support = torch.randperm(S, generator=generator)[:k]
            weights = torch.rand(k, generator=generator, dtype=torch.float64)
            P[s, a, support] = weights / weights.sum()
    # c_sa is a product of two uniforms, which skews the coefficients toward 0 as in the reference.
    c = torch.rand(S, A, generator=generator, dtype=torch.float64) * torch.rand(
        S, A, generator=generator, dtype=torch.float64
    )
    M = torch.randn(n, n, generator=generator, dtype=torch.float64)
    x0 = torch.randn(n, generator=generator, dtype=torch.float64)
    return RandomMDP(P, c, M, x0)


def synthetic_reward(c: torch.Tensor, M: torch.Tensor) -> RewardFn:
    """r_x(s, a) = c_sa · xᵀMx: every state-action pair sees the same quadratic form, scaled."""

    def reward(x: torch.Tensor) -> torch.Tensor:
        return c * (x @ M @ x)

    return reward


def synthetic_objective(x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """f(x, π) = ½‖x‖² + ½Σπ², minimized at x = 0, where π*_0 is uniform, with value S/(2A)."""
    return 0.5 * (x * x).sum() + 0.5 * (pi * pi).sum()


# ---------------------------------------------------------------------------------------------------------
# Algorithm 1's estimator
# ---------------------------------------------------------------------------------------------------------


def amortized_w_step(w: torch.Tensor, A: torch.Tensor, b: torch.Tensor, xi: float) -> torch.Tensor:
    """One gradient step on ½‖A w − b‖² (line 4 of Algorithm 1): w tracks A⁻¹b across outer iterations."""
    return w - xi * (A.T @ (A @ w - b))


def msobirl_hypergradient(
    P: torch.Tensor,
    reward: RewardFn,
    x: torch.Tensor,
    V: torch.Tensor,
    pi: torch.Tensor,
    grad_x_f: torch.Tensor,
    grad_pi_f: torch.Tensor,
    w: torch.Tensor,
    gamma: float,
    tau: float,
) -> torch.Tensor:
    """Algorithm 1's estimator ĝ = ∇_x f + (1/τ)[Σ π ∇_π f ∇_x r − Φ̃ᵀ w] at the current iterates (line 5).

    Φ̃(s) = Σ_a π̃(a|s) ∇_x r(s,a) with π̃ = softmax((r_x + γPV)/τ): the policy one more soft Bellman step would
    give, i.e. the gradient of the soft value estimate (10). At V = V*, π = π* and w = w* this is exactly (9).
    """
    with torch.no_grad():
        Q_tilde = soft_q(P, reward(x.detach()), V, gamma)
        # exp(Q − soft max) rather than torch.softmax, whose CPU kernel pays milliseconds of thread start-up on
        # (S, A) inputs this small
        pi_tilde = torch.exp((Q_tilde - soft_value(Q_tilde, tau)[:, None]) / tau)
    cotangent = pi * grad_pi_f - pi_tilde * w[:, None]
    return grad_x_f + reward_vjp(reward, x, cotangent) / tau


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------


def save_plot(path: str, f_history: Sequence[float], grad_history: Sequence[float], f_min: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Once f is within float64 resolution of f_min the gap is 0 or a rounding-level negative, which a log axis
    # cannot show; those points are left out rather than faked.
    gaps = [g if g > 0 else math.nan for g in (v - f_min for v in f_history)]
    fig, (ax_f, ax_g) = plt.subplots(1, 2, figsize=(11, 4))
    ax_f.semilogy(range(len(gaps)), gaps)
    ax_f.set_xlabel("iteration k")
    ax_f.set_ylabel(f"f(x_k, π_k) − S/(2A)   (S/(2A) = {f_min:g})")
    ax_f.grid(True, which="both", alpha=0.3)
    ax_g.semilogy(range(len(grad_history)), grad_history, color="tab:orange")
    ax_g.set_xlabel("iteration k")
    ax_g.set_ylabel("‖ĝ_k‖")
    ax_g.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validate(args: Args) -> None:
    require_positive(args, "num_states", "num_actions", "x_dim", "tau", "iterations", "beta", "xi", "inner_iterations")
    require(0.0 <= args.gamma < 1.0, f"--gamma must be in [0, 1), got {args.gamma}")
    require(args.inner_tol >= 0.0, f"--inner-tol must be non-negative, got {args.inner_tol}")
    require_folder_name(args, "runs_dir")
    # checked up front so that a typo does not cost a whole run before the plot fails
    require(not args.plot or args.plot.lower().endswith(".png"), f"--plot must name a .png file, got {args.plot!r}")
    for name in ("gamma", "tau", "beta", "xi", "inner_tol"):
        value = getattr(args, name)
        require(math.isfinite(value), f"--{name.replace('_', '-')} must be finite, got {value}")


# ---------------------------------------------------------------------------------------------------------
# Algorithm 1
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    args = parse_args(Args, argv, DESCRIPTION)
    validate(args)
    limit_cpu_threads()
    device = pick_device(args.cuda)
    S, A = args.num_states, args.num_actions
    env_id = f"RandomMDP-S{S}-A{A}"
    run_name = make_run_name(env_id, args.exp_name, args.seed)
    writer = SummaryWriter(os.path.join(args.runs_dir, run_name))
    writer.add_text("hyperparameters", hyperparameter_table(args))

    # Everything random comes from this generator, drawn on the CPU so that a seed names the same instance on
    # any device (the reference drew its instance before seeding, so its runs cannot be repeated).
    generator = torch.Generator().manual_seed(args.seed)
    mdp = make_random_mdp(S, A, args.x_dim, generator)
    w0 = torch.randn(S, generator=generator, dtype=torch.float64)
    P, c, M = (t.to(device) for t in (mdp.P, mdp.c, mdp.M))
    reward, f = synthetic_reward(c, M), synthetic_objective
    gamma, tau = args.gamma, args.tau
    f_min = S / (2 * A)

    x = mdp.x0.to(device)
    w = w0.to(device)
    # V_0 = 0 gives Q_0 = γPV_0 = 0 and the uniform π_0.
    V = torch.zeros(S, dtype=torch.float64, device=device)
    pi = torch.full((S, A), 1.0 / A, dtype=torch.float64, device=device)

    history: dict[str, list[float]] = {"f": [], "grad_norm": [], "x_norm": [], "inner_sweeps": []}
    start = time.time()
    progress = tqdm(range(args.iterations), desc="M-SoBiRL", dynamic_ncols=True)
    for k in progress:
        f_value, grad_x_f, grad_pi_f = upper_level_gradients(f, x, pi)

        A_k = least_squares_matrix(P, pi, gamma)
        b_k = least_squares_rhs(P, pi, grad_pi_f, gamma)
        w = amortized_w_step(w, A_k, b_k, args.xi)

        g_hat = msobirl_hypergradient(P, reward, x, V, pi, grad_x_f, grad_pi_f, w, gamma, tau)
        x_norm = x.norm().item()
        x = x - args.beta * g_hat

        # Warm start (line 10): V_k is already near V*_{x_{k+1}} when x moves by β·ĝ, so a constant N keeps up.
        with torch.no_grad():
            V, _, pi, sweeps = soft_value_iteration(
                P, reward(x), gamma, tau, V0=V, max_sweeps=args.inner_iterations, tol=args.inner_tol
            )

        f_k, g_norm = f_value.item(), g_hat.norm().item()
        history["f"].append(f_k)
        history["grad_norm"].append(g_norm)
        history["x_norm"].append(x_norm)
        history["inner_sweeps"].append(sweeps)
        writer.add_scalar("charts/upper_objective", f_k, k)
        writer.add_scalar("charts/optimality_gap", f_k - f_min, k)
        writer.add_scalar("losses/hypergradient_norm", g_norm, k)
        writer.add_scalar("charts/x_norm", x_norm, k)
        writer.add_scalar("charts/least_squares_residual", (A_k @ w - b_k).norm().item(), k)
        writer.add_scalar("charts/inner_sweeps", sweeps, k)
        if k % 10 == 0 or k == args.iterations - 1:
            progress.set_postfix(f=f"{f_k:.6g}", grad=f"{g_norm:.3g}", refresh=False)
        if not math.isfinite(f_k) or not math.isfinite(g_norm):
            progress.write(f"diverged at iteration {k}: f={f_k} grad_norm={g_norm}")
            break
    progress.close()

    # The last x step has a policy too: log f(x_K, π_K) so the curve ends where the run ends.
    K = len(history["grad_norm"])
    f_final = f(x, pi).item()
    history["f"].append(f_final)
    history["x_norm"].append(x.norm().item())
    writer.add_scalar("charts/upper_objective", f_final, K)
    writer.add_scalar("charts/optimality_gap", f_final - f_min, K)
    writer.add_scalar("charts/x_norm", history["x_norm"][-1], K)
    writer.add_scalar("charts/wall_time_s", time.time() - start, K)
    writer.close()

    if args.plot:
        save_plot(
            args.plot,
            history["f"],
            history["grad_norm"],
            f_min,
            f"M-SoBiRL on {env_id}, n={args.x_dim}, seed {args.seed}",
        )
    print(f"f={f_final:.10g} grad_norm={history['grad_norm'][-1]:.6g}")
    return history


if __name__ == "__main__":
    run_cli(main)
