"""Tests for agents/msobirl.py: the closed-form hyper-gradient (9), Algorithm 1's estimator, soft value iteration
and the synthetic experiment end to end."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents.exact.soft_mdp import (
    exact_hypergradient,
    least_squares_matrix,
    least_squares_rhs,
    policy_transition,
    soft_value_iteration,
    upper_level_gradients,
)
from agents.infra.cli import UsageError
from agents.msobirl import (
    amortized_w_step,
    main,
    make_random_mdp,
    msobirl_hypergradient,
    synthetic_objective,
    synthetic_reward,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "agents" / "msobirl.py"


def random_transitions(S: int, A: int, seed: int) -> torch.Tensor:
    return make_random_mdp(S, A, 1, torch.Generator().manual_seed(seed)).P


def nonquadratic_problem(S: int, A: int, n: int, seed: int):
    """A reward and an upper-level objective with no quadratic structure, to test (9) beyond the synthetic case."""
    g = torch.Generator().manual_seed(1000 + seed)
    W = torch.randn(S * A, n, generator=g, dtype=torch.float64)
    u = torch.randn(n, generator=g, dtype=torch.float64)
    c = torch.rand(S, A, generator=g, dtype=torch.float64)
    target = torch.softmax(torch.randn(S, A, generator=g, dtype=torch.float64), dim=-1)

    def reward(x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.tanh(W @ x).reshape(S, A) + c * torch.sin(u @ x) + 0.1 * (x**3).sum()

    def objective(x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        # a KL to a target policy plus a non-convex term coupling x and π
        return (pi * (pi.log() - target.log())).sum() + torch.log1p((x * x).sum()) + torch.cos(x[0]) * pi[0, 0]

    x0 = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return reward, objective, x0


def hyper_objective(P, reward, f, x, gamma, tau) -> float:
    with torch.no_grad():
        _, _, pi, _ = soft_value_iteration(P, reward(x), gamma, tau, tol=1e-13)
        return f(x, pi).item()


def central_differences(P, reward, f, x, gamma, tau, h=1e-5) -> torch.Tensor:
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = h
        grad[i] = (
            hyper_objective(P, reward, f, x + e, gamma, tau) - hyper_objective(P, reward, f, x - e, gamma, tau)
        ) / (2 * h)
    return grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "S,A,n,gamma,tau,seed",
    [(4, 3, 5, 0.5, 1.0, 0), (6, 2, 4, 0.9, 0.3, 1), (5, 4, 6, 0.7, 2.0, 2), (3, 5, 3, 0.0, 0.5, 3)],
)
def test_exact_hypergradient_matches_finite_differences_nonquadratic(S, A, n, gamma, tau, seed):
    P = random_transitions(S, A, seed)
    reward, f, x = nonquadratic_problem(S, A, n, seed)
    exact = exact_hypergradient(P, reward, f, x, gamma, tau)
    fd = central_differences(P, reward, f, x, gamma, tau)
    assert relative_error(exact, fd) <= 1e-6


def test_exact_hypergradient_matches_finite_differences_synthetic():
    mdp = make_random_mdp(5, 3, 6, torch.Generator().manual_seed(7))
    reward = synthetic_reward(mdp.c, mdp.M)
    x = 2.0 * mdp.x0  # rewards O(1): π* is neither uniform nor deterministic, so the implicit term is sizeable
    exact = exact_hypergradient(mdp.P, reward, synthetic_objective, x, 0.5, 1.0)
    fd = central_differences(mdp.P, reward, synthetic_objective, x, 0.5, 1.0)
    assert relative_error(exact, fd) <= 1e-6
    assert relative_error(exact, x) > 1e-2, "the implicit term should not vanish on this instance"


def test_exact_hypergradient_works_under_no_grad():
    P = random_transitions(4, 3, 5)
    reward, f, x = nonquadratic_problem(4, 3, 5, 5)
    expected = exact_hypergradient(P, reward, f, x, 0.6, 1.0)
    with torch.no_grad():
        got = exact_hypergradient(P, reward, f, x, 0.6, 1.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimator_with_exact_w_equals_exact_hypergradient(seed):
    S, A, n, gamma, tau = 5, 3, 4, 0.8, 0.7
    P = random_transitions(S, A, seed)
    reward, f, x = nonquadratic_problem(S, A, n, seed)
    with torch.no_grad():
        V, _, pi, _ = soft_value_iteration(P, reward(x), gamma, tau, tol=1e-13)
    _, grad_x_f, grad_pi_f = upper_level_gradients(f, x, pi)
    A_mat = least_squares_matrix(P, pi, gamma)
    w_star = torch.linalg.solve(A_mat, least_squares_rhs(P, pi, grad_pi_f, gamma))
    estimate = msobirl_hypergradient(P, reward, x, V, pi, grad_x_f, grad_pi_f, w_star, gamma, tau)
    exact = exact_hypergradient(P, reward, f, x, gamma, tau)
    assert relative_error(estimate, exact) <= 1e-10


def test_amortized_w_step_converges_to_the_linear_solution():
    S, A, gamma = 6, 3, 0.5
    P = random_transitions(S, A, 4)
    pi = torch.softmax(torch.randn(S, A, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    A_mat = least_squares_matrix(P, pi, gamma)
    b = least_squares_rhs(P, pi, pi, gamma)
    w = torch.zeros(S, dtype=torch.float64)
    for _ in range(500):
        w = amortized_w_step(w, A_mat, b, 0.5)
    torch.testing.assert_close(w, torch.linalg.solve(A_mat, b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma,tau", [(0.5, 1.0), (0.95, 0.1), (0.0, 2.0)])
def test_soft_value_iteration_fixed_point_is_soft_consistent(gamma, tau):
    S, A = 7, 4
    P = random_transitions(S, A, 3)
    r = torch.randn(S, A, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    V, Q, pi, sweeps = soft_value_iteration(P, r, gamma, tau, tol=1e-12)
    assert sweeps < 100_000
    # Stopping at ‖ΔV‖_∞ < 1e-12 leaves V within γ/(1−γ)·1e-12 of V*, and π within that over τ.
    atol = 10 * 1e-12 / ((1 - gamma) * min(tau, 1.0))
    # (5) the policy is the softmax of Q/τ, a proper distribution
    torch.testing.assert_close(pi, torch.softmax(Q / tau, dim=-1), rtol=0, atol=atol)
    torch.testing.assert_close(pi.sum(-1), torch.ones(S, dtype=torch.float64), rtol=0, atol=atol)
    # (6) Q is the one-step soft backup of V
    torch.testing.assert_close(Q, r + gamma * torch.einsum("sat,t->sa", P, V), rtol=0, atol=1e-12)
    # (7) V is the soft maximum of Q
    torch.testing.assert_close(V, tau * torch.logsumexp(Q / tau, dim=-1), rtol=0, atol=atol)

    # V is the entropy-regularized value of π, and no other policy does better
    def soft_value_of(policy):
        P_pi = policy_transition(P, policy)
        return torch.linalg.solve(
            torch.eye(S, dtype=torch.float64) - gamma * P_pi, (policy * (r - tau * policy.log())).sum(-1)
        )

    # normalized first: the unnormalized π_k's residual mass would otherwise enter linearly, times 1/(1−γ)
    torch.testing.assert_close(soft_value_of(pi / pi.sum(-1, keepdim=True)), V, rtol=0, atol=atol)
    g = torch.Generator().manual_seed(11)
    for _ in range(5):
        other = torch.softmax(3 * torch.randn(S, A, generator=g, dtype=torch.float64), dim=-1)
        assert bool((soft_value_of(other) <= V + 1e-10).all())


def test_random_mdp_is_a_sparse_stochastic_tensor_determined_by_the_seed():
    S, A, n = 10, 5, 7
    mdp = make_random_mdp(S, A, n, torch.Generator().manual_seed(3))
    torch.testing.assert_close(mdp.P.sum(-1), torch.ones(S, A, dtype=torch.float64))
    support = (mdp.P > 0).sum(-1)
    assert int(support.min()) >= 1 and int(support.max()) <= S - 1
    assert mdp.c.shape == (S, A) and bool(((mdp.c >= 0) & (mdp.c <= 1)).all())
    assert mdp.M.shape == (n, n) and mdp.x0.shape == (n,)
    again = make_random_mdp(S, A, n, torch.Generator().manual_seed(3))
    other = make_random_mdp(S, A, n, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(mdp, again))
    assert not torch.equal(mdp.P, other.P)


def test_short_run_reaches_the_minimum(tmp_path):
    S, A = 4, 2
    history = main(
        [
            "--num-states",
            str(S),
            "--num-actions",
            str(A),
            "--x-dim",
            "10",
            "--iterations",
            "500",
            "--no-cuda",
            "--runs-dir",
            str(tmp_path),
        ]
    )
    f_min = S / (2 * A)
    assert abs(history["f"][-1] - f_min) <= 0.01 * f_min
    assert history["grad_norm"][-1] < history["grad_norm"][0]


def test_same_seed_same_run(tmp_path):
    argv = [
        "--num-states",
        "4",
        "--num-actions",
        "3",
        "--x-dim",
        "8",
        "--iterations",
        "30",
        "--runs-dir",
        str(tmp_path),
    ]
    first, second = main(argv + ["--seed", "5"]), main(argv + ["--seed", "5"])
    assert first == second
    assert main(argv + ["--seed", "6"])["f"] != first["f"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num-states", "0"], "--num-states"),
        (["--gamma", "1.0"], "--gamma"),
        (["--tau", "0"], "--tau"),
        (["--xi", "-0.5"], "--xi"),
        (["--inner-iterations", "0"], "--inner-iterations"),
        (["--beta", "nan"], "--beta"),
        (["--plot", "curve.pdf"], "--plot"),
        (["--runs-dir", ""], "--runs-dir must name a folder"),
    ],
)
def test_bad_flags_raise_usage_error(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where --runs-dir "" would write, were it accepted
    with pytest.raises(UsageError, match=re.escape(message)):
        main(["--runs-dir", str(tmp_path), "--iterations", "3", *flags])  # a --runs-dir in `flags` wins
    assert not any(tmp_path.iterdir()), "validation must happen before the run directory is created"


def _run_script(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_script_smoke(tmp_path):
    plot = tmp_path / "curve.png"
    result = _run_script("--iterations", "5", "--runs-dir", str(tmp_path / "runs"), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"f=(\S+) grad_norm=(\S+)", last)
    assert match, last
    assert all(math.isfinite(float(v)) for v in match.groups())
    assert list((tmp_path / "runs").glob("RandomMDP-S10-A5__msobirl__1__*/events.out.tfevents.*"))
    assert plot.stat().st_size > 0


def test_script_bad_input_is_one_line_exit_2(tmp_path):
    result = _run_script("--gamma", "1.5", "--runs-dir", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --gamma must be in [0, 1), got 1.5"]
