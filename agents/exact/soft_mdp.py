"""Entropy-regularised tabular MDPs, exactly: soft value iteration and the closed-form hyper-gradient (9) of
arXiv 2405.19697, the references that M-SoBiRL (`agents/msobirl.py`) and the tabular checks
(`agents/exact/tabular_bilevel.py`) are measured against.

Shapes: P is (S, A, S) with P[s, a, s'] = P(s' | s, a); rewards, Q and π are (S, A); V and w are (S,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RewardFn = Callable[[torch.Tensor], torch.Tensor]  # x (n,) -> rewards (S, A), differentiable in x
ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (n,), π (S, A)) -> scalar


# ---------------------------------------------------------------------------------------------------------
# Lower level: soft value iteration
# ---------------------------------------------------------------------------------------------------------


def soft_q(P: torch.Tensor, reward: torch.Tensor, V: torch.Tensor, gamma: float) -> torch.Tensor:
    """Q(s, a) = r(s, a) + γ Σ_s' P(s'|s, a) V(s')."""
    return reward + gamma * (P @ V)


def soft_value(Q: torch.Tensor, tau: float) -> torch.Tensor:
    """V(s) = τ log Σ_a exp(Q(s, a)/τ), via logsumexp: the default run's rewards pass 10³, beyond float64's exp."""
    return tau * torch.logsumexp(Q / tau, dim=-1)


def soft_value_iteration(
    P: torch.Tensor,
    reward: torch.Tensor,
    gamma: float,
    tau: float,
    V0: torch.Tensor | None = None,
    max_sweeps: int = 100_000,
    tol: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Iterate V ← τ log Σ_a exp((r + γPV)/τ) from V0 (zeros if None) until ‖ΔV‖_∞ < tol or max_sweeps.

    Returns (V, Q, π, sweeps) with Q = r + γPV and π = exp((Q − V)/τ). π is deliberately not renormalized: it
    sums to one only at the fixed point, which is how Algorithm 1 defines π_k after an inexact inner loop.
    """
    with torch.no_grad():
        V = torch.zeros(P.shape[0], dtype=P.dtype, device=P.device) if V0 is None else V0.clone()
        sweeps = 0
        while sweeps < max_sweeps:
            V_next = soft_value(soft_q(P, reward, V, gamma), tau)
            sweeps += 1
            delta = (V_next - V).abs().max().item()
            V = V_next
            if delta < tol:
                break
        Q = soft_q(P, reward, V, gamma)
        pi = torch.exp((Q - V[:, None]) / tau)
    return V, Q, pi, sweeps


def policy_transition(P: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """P_π(s, s') = Σ_a π(a|s) P(s'|s, a), the (S, S) state chain under π."""
    return torch.einsum("sat,sa->st", P, pi)


# ---------------------------------------------------------------------------------------------------------
# Hyper-gradient: exact closed form (9) and the pieces of Algorithm 1's estimator
# ---------------------------------------------------------------------------------------------------------


def upper_level_gradients(
    f: ObjectiveFn, x: torch.Tensor, pi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f(x, π), ∇_x f, ∇_π f) with x and π treated as independent variables (partial derivatives)."""
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        pi_leaf = pi.detach().requires_grad_(True)
        value = f(x_leaf, pi_leaf)
        grad_x, grad_pi = torch.autograd.grad(value, (x_leaf, pi_leaf), allow_unused=True)
    # f may ignore one of its arguments; its partial derivative is then zero, not missing.
    grad_x = torch.zeros_like(x_leaf) if grad_x is None else grad_x
    grad_pi = torch.zeros_like(pi_leaf) if grad_pi is None else grad_pi
    return value.detach(), grad_x, grad_pi


def least_squares_rhs(P: torch.Tensor, pi: torch.Tensor, grad_pi_f: torch.Tensor, gamma: float) -> torch.Tensor:
    """b(s') = Σ_{s,a} (1[s = s'] − γ P(s'|s, a)) π(a|s) ∇_π f(s, a), the right-hand side of A w = b."""
    h = pi * grad_pi_f
    return h.sum(dim=-1) - gamma * torch.einsum("sat,sa->t", P, h)


def least_squares_matrix(P: torch.Tensor, pi: torch.Tensor, gamma: float) -> torch.Tensor:
    """A = (I − γ P_π)ᵀ; A w* = b makes w*ᵀ Φ the implicit term through V*, without any SA × SA system."""
    eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    return (eye - gamma * policy_transition(P, pi)).T


def reward_vjp(reward: RewardFn, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """Σ_{s,a} cotangent(s, a) ∇_x r_x(s, a), as one vector-Jacobian product instead of the (S, A, n) Jacobian."""
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        r = reward(x_leaf)
        if not r.requires_grad:  # a reward that ignores x has a zero Jacobian
            return torch.zeros_like(x_leaf)
        (vjp,) = torch.autograd.grad(r, x_leaf, grad_outputs=cotangent.detach(), allow_unused=True)
    return torch.zeros_like(x_leaf) if vjp is None else vjp


def exact_hypergradient(
    P: torch.Tensor,
    reward: RewardFn,
    f: ObjectiveFn,
    x: torch.Tensor,
    gamma: float,
    tau: float,
    *,
    tol: float = 1e-12,
    max_sweeps: int = 100_000,
) -> torch.Tensor:
    """∇_x f(x, π*_x) by the closed form (9), with π*_x from soft value iteration to `tol`.

    (9) reads ∇φ = ∇_x f + (1/τ) Σ_{s,a} π*(a|s) ∇_π f(s,a) [∇_x Q*(s,a) − ∇_x V*(s)]. Substituting
    ∇_x Q* = ∇_x r + γ P ∇_x V* and ∇_x V* = (I − γP_π*)⁻¹ Σ_a π* ∇_x r leaves a single S × S solve
    A w* = b, after which ∇φ = ∇_x f + (1/τ) Σ_{s,a} [π* ∇_π f − π* w*(s)] ∇_x r(s,a), one VJP through r.
    """
    with torch.no_grad():
        r = reward(x.detach())
    _, _, pi, _ = soft_value_iteration(P, r, gamma, tau, max_sweeps=max_sweeps, tol=tol)
    _, grad_x_f, grad_pi_f = upper_level_gradients(f, x, pi)
    A = least_squares_matrix(P, pi, gamma)
    b = least_squares_rhs(P, pi, grad_pi_f, gamma)
    w_star = torch.linalg.solve(A, b)
    cotangent = pi * grad_pi_f - pi * w_star[:, None]
    return grad_x_f + reward_vjp(reward, x, cotangent) / tau
