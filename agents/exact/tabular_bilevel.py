"""Exact tabular hyper-gradients of bilevel RL from preferences: SoBiRL, M-SoBiRL, PARL, penalty methods, AIHF.

Everything here is float64 and exact up to rounding, so that each method's gradient can be compared, as a number,
with central finite differences of the true hyper-objective F(phi) = l_up(phi, pi*_phi) (`hyper_objective`). No
function here samples anything: all (S*A)^H fragments of a small soft MDP with a linear reward are enumerated
(`make_instance`, `enumerate_fragments`), and the lower level over tabular logits theta is the exact soft value
J(theta; phi) (`lower_objective`), maximised by theta* = Q*/tau (tau: the temperature, SAC's alpha). Shapes and the
soft-MDP primitives: agents/exact/soft_mdp.py (P[s, a, s'] = P(s'|s, a)).

The instance, each method's formula (SoBiRL Prop. 5.1-5.2 and estimator (78), M-SoBiRL's (9), PARL's implicit
function theorem, the penalty forms of Kwon et al./PBRL and Gaur et al., AIHF's Lemma 4.1) and what the comparison
shows: docs/algorithms.md §8; `python sobirl/tabular_compare.py` prints the table.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from agents.exact.soft_mdp import exact_hypergradient, policy_transition, soft_value_iteration

DTYPE = torch.float64


class TabularInstance(NamedTuple):
    """A seeded soft MDP with a linear reward; `phi` is the point at which gradients are evaluated."""

    P: torch.Tensor  # (S, A, S) transitions
    features: torch.Tensor  # (S, A, d), r_φ = features @ φ
    rho0: torch.Tensor  # (S,) initial distribution
    true_reward: torch.Tensor  # (S, A) the labeller's reward
    phi: torch.Tensor  # (d,) evaluation point
    gamma: float
    tau: float


class Fragments(NamedTuple):
    """Every length-H fragment, with its policy-independent probability factor and the pair labels."""

    states: torch.Tensor  # (N, H) long
    actions: torch.Tensor  # (N, H) long
    dynamics: torch.Tensor  # (N,) ρ0(s_0) Π_{h<H−1} P(s_{h+1}|s_h, a_h)
    labels: torch.Tensor  # (N, N) y_ij = σ(R_true(τ_i) − R_true(τ_j))


class LowerDerivatives(NamedTuple):
    """Second derivatives of J at (θ, φ), θ flattened to S·A entries (row-major, index s·A + a)."""

    K: torch.Tensor  # (SA, SA) −∇²_θθ J, positive semi-definite at θ*, null along per-state logit shifts
    M: torch.Tensor  # (SA, d) ∇²_θφ J


# ---------------------------------------------------------------------------------------------------------------
# Instance and enumeration
# ---------------------------------------------------------------------------------------------------------------


TRANSITIONS = ("dense", "action-dependent")
ACTION_DEPENDENT_SCALE = 6.0  # P(·|s,a) = softmax(6·N(0, 1)): most of each row's mass on one or two next states


def make_instance(
    num_states: int = 3,
    num_actions: int = 2,
    num_features: int = 4,
    gamma: float = 0.5,
    tau: float = 0.7,
    seed: int = 0,
    transitions: str = "dense",
) -> TabularInstance:
    """Draw a random instance from `seed` (ρ0 > 0 everywhere).

    transitions="dense" (the default): every P(s'|s,a) ≥ 0.1/(S + 0.1·S) > 0, rows uniform-ish and barely dependent
    on the action. "action-dependent": each row P(·|s,a) = softmax(6·N(0, 1)), peaked on one or two next states
    that differ from action to action, the regime in which SoBiRL's one-step truncation (78) is far off
    (docs/algorithms.md §8). The two options draw P from the same generator but differently, so one seed names
    two unrelated instances. The draws do not depend on γ or τ, so one seed (and option) names the same MDP,
    features and φ at any discount/temperature.
    """
    if transitions not in TRANSITIONS:
        raise ValueError(f"unknown transitions {transitions!r}: use one of {', '.join(TRANSITIONS)}")
    g = torch.Generator().manual_seed(seed)
    S, A, d = num_states, num_actions, num_features
    if transitions == "dense":
        P = torch.rand(S, A, S, generator=g, dtype=DTYPE) + 0.1
        P = P / P.sum(-1, keepdim=True)
    else:
        P = torch.softmax(ACTION_DEPENDENT_SCALE * torch.randn(S, A, S, generator=g, dtype=DTYPE), dim=-1)
    features = torch.randn(S, A, d, generator=g, dtype=DTYPE)
    phi = torch.randn(d, generator=g, dtype=DTYPE)
    rho0 = torch.softmax(torch.randn(S, generator=g, dtype=DTYPE), 0)
    true_reward = torch.randn(S, A, generator=g, dtype=DTYPE)
    return TabularInstance(P, features, rho0, true_reward, phi, float(gamma), float(tau))


def enumerate_fragments(inst: TabularInstance, horizon: int) -> Fragments:
    """All (S·A)^H fragments (s_0, a_0, …, s_{H−1}, a_{H−1}) with their dynamics factor and the soft labels."""
    S, A, _ = inst.P.shape
    steps = list(itertools.product(range(S), range(A)))
    trajectories = list(itertools.product(steps, repeat=horizon))
    states = torch.tensor([[s for s, _ in tr] for tr in trajectories], dtype=torch.long)
    actions = torch.tensor([[a for _, a in tr] for tr in trajectories], dtype=torch.long)
    moves = inst.P[states[:, :-1], actions[:, :-1], states[:, 1:]].prod(1)
    dynamics = inst.rho0[states[:, 0]] * moves
    true_returns = inst.true_reward[states, actions].sum(1)
    labels = torch.sigmoid(true_returns[:, None] - true_returns[None, :])
    return Fragments(states, actions, dynamics, labels)


def reward(features: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """r_φ(s, a) = features(s, a) · φ, (S, A)."""
    return features @ phi


# ---------------------------------------------------------------------------------------------------------------
# Lower level: soft-optimal policy, exact policy evaluation, occupancies
# ---------------------------------------------------------------------------------------------------------------


def soft_optimal(inst: TabularInstance, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q*, V*, π*) for r_φ, by soft value iteration run to machine precision.

    The soft Bellman operator is a γ-contraction in sup norm, so n sweeps from V = 0 leave an error of order γⁿ;
    n = 10 + ⌈40 / ln(1/γ)⌉ makes γⁿ < e⁻⁴⁰ ≈ 4e-18 (γ = 0 needs one sweep). π* = softmax(Q*/τ), exactly
    normalised.
    """
    sweeps = 10 if inst.gamma == 0 else 10 + math.ceil(40.0 / math.log(1.0 / inst.gamma))
    r = reward(inst.features, phi.detach())
    # tol = 0 never stops early: exactly `sweeps` sweeps, however small the change gets.
    V, Q, _, _ = soft_value_iteration(inst.P, r, inst.gamma, inst.tau, max_sweeps=sweeps, tol=0.0)
    return Q, V, torch.softmax(Q / inst.tau, dim=-1)


def state_occupancy(P: torch.Tensor, pi: torch.Tensor, rho0: torch.Tensor, gamma: float) -> torch.Tensor:
    """d_π(s) = Σ_t γ^t Pr_π(s_t = s | s_0 ~ ρ0), the solution of (I − γ P_π)ᵀ d = ρ0; sums to 1/(1 − γ)."""
    eye = torch.eye(P.shape[0], dtype=P.dtype)
    return torch.linalg.solve((eye - gamma * policy_transition(P, pi)).T, rho0)


def occupancy(P: torch.Tensor, pi: torch.Tensor, rho0: torch.Tensor, gamma: float) -> torch.Tensor:
    """d_π(s, a) = d_π(s) π(a|s), the discounted state-action occupancy from ρ0, (S, A)."""
    return state_occupancy(P, pi, rho0, gamma)[:, None] * pi


def soft_policy_value(
    P: torch.Tensor, r: torch.Tensor, pi: torch.Tensor, rho0: torch.Tensor, gamma: float, tau: float
) -> torch.Tensor:
    """J = ρ0 · V^π with V^π = (I − γ P_π)⁻¹ Σ_a π(a|·)(r(·, a) − τ log π(a|·)): exact soft policy evaluation.

    Differentiable in π and r (one S × S linear solve). π must be strictly positive (log π is taken).
    """
    eye = torch.eye(P.shape[0], dtype=P.dtype)
    entropy_reward = (pi * (r - tau * torch.log(pi))).sum(-1)
    V = torch.linalg.solve(eye - gamma * policy_transition(P, pi), entropy_reward)
    return rho0 @ V


def lower_objective(theta: torch.Tensor, phi: torch.Tensor, inst: TabularInstance) -> torch.Tensor:
    """J(θ; φ) = soft value of π_θ = softmax(θ) (row-wise) under r_φ, from ρ0."""
    pi = torch.softmax(theta, dim=-1)
    return soft_policy_value(inst.P, reward(inst.features, phi), pi, inst.rho0, inst.gamma, inst.tau)


def value_reward_gradient(inst: TabularInstance, pi: torch.Tensor) -> torch.Tensor:
    """∇_φ J(θ; φ) at fixed π_θ = Σ_{s,a} d_π(s,a) ∇r(s,a) = E_π[Σ_t γ^t ∇_φ r_φ(s_t, a_t)], s_0 ~ ρ0, (d,).

    The entropy bonus does not depend on φ, so this is the whole φ-gradient of the lower objective.
    """
    d = occupancy(inst.P, pi, inst.rho0, inst.gamma)
    return torch.einsum("sa,sak->k", d, inst.features)


# ---------------------------------------------------------------------------------------------------------------
# Upper level
# ---------------------------------------------------------------------------------------------------------------


def fragment_probabilities(pi: torch.Tensor, frags: Fragments) -> torch.Tensor:
    """p_π(τ) = dynamics(τ) Π_h π(a_h|s_h), (N,); sums to 1."""
    return frags.dynamics * pi[frags.states, frags.actions].prod(1)


def fragment_returns(r: torch.Tensor, frags: Fragments) -> torch.Tensor:
    """R(τ) = Σ_{h<H} r(s_h, a_h), undiscounted, (N,)."""
    return r[frags.states, frags.actions].sum(1)


def pair_losses(phi: torch.Tensor, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """ℓ_ij(φ) = BCE(σ(R_φ(τ_i) − R_φ(τ_j)), y_ij) = softplus(R_j − R_i) + (1 − y_ij)(R_i − R_j), (N, N)."""
    R = fragment_returns(reward(inst.features, phi), frags)
    return F.binary_cross_entropy_with_logits(R[:, None] - R[None, :], frags.labels, reduction="none")


def upper_loss(phi: torch.Tensor, pi: torch.Tensor, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """ℓ_up(φ, π) = Σ_{i,j} p_π(τ_i) p_π(τ_j) ℓ_ij(φ): the expected BCE over independent fragment pairs from π."""
    p = fragment_probabilities(pi, frags)
    return p @ pair_losses(phi, inst, frags) @ p


def hyper_objective(phi: torch.Tensor, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """F(φ) = ℓ_up(φ, π*_φ), the true hyper-objective (a value, not differentiable by autograd)."""
    _, _, pi = soft_optimal(inst, phi)
    return upper_loss(phi, pi, inst, frags)


def central_difference(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """∂fn/∂x_k ≈ (fn(x + ε e_k) − fn(x − ε e_k)) / 2ε for every k: error O(ε²) + O(rounding/ε)."""
    grad = torch.zeros_like(x)
    for k in range(x.numel()):
        step = torch.zeros_like(x)
        step[k] = eps
        grad[k] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return grad


def explicit_gradient(phi: torch.Tensor, pi: torch.Tensor, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """∇_φ ℓ_up(φ, π) with π held fixed (the BCE, or "exploitation", term), (d,).

    ∂ℓ_ij/∂φ = (σ(R_i − R_j) − y_ij)(Φ_i − Φ_j) with Φ_i = Σ_h features(s_h, a_h) of fragment i, so the term is
    Σ_{i,j} p_i p_j (σ(R_i − R_j) − y_ij)(Φ_i − Φ_j).
    """
    p = fragment_probabilities(pi, frags)
    R = fragment_returns(reward(inst.features, phi), frags)
    error = torch.sigmoid(R[:, None] - R[None, :]) - frags.labels
    weights = p[:, None] * p[None, :] * error
    Phi = inst.features[frags.states, frags.actions].sum(1)  # (N, d)
    return (weights.sum(1) - weights.sum(0)) @ Phi


def _score_weights(phi: torch.Tensor, pi: torch.Tensor, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """u_i = Σ_j p_i p_j (ℓ_ij + ℓ_ji): fragment i's total loss weight over the pairs it sits in, either side.

    With the symmetric soft labels here (y_ji = 1 − y_ij) ℓ_ji = ℓ_ij, so u_i = 2 Σ_j p_i p_j ℓ_ij; the general form
    is kept so that asymmetric losses would stay correct.
    """
    p = fragment_probabilities(pi, frags)
    w = p[:, None] * p[None, :] * pair_losses(phi, inst, frags)
    return w.sum(1) + w.sum(0)


def score_function_gradient(
    phi: torch.Tensor, pi: torch.Tensor, inst: TabularInstance, frags: Fragments
) -> torch.Tensor:
    """g = ∇_θ ℓ_up(φ, softmax θ) at π = softmax θ, by the likelihood-ratio identity, (S, A).

    g = Σ_{i,j} p_i p_j ℓ_ij Σ_{t ∈ τ_i ∪ τ_j} ∇_θ log π_θ(a_t|s_t), with ∂ log π_θ(a_t|s_t)/∂θ(s, a) =
    1[s = s_t](1[a = a_t] − π(a|s)). Exact here because the expectation is a finite sum. Each row sums to zero:
    g is orthogonal to per-state logit shifts.
    """
    S, A = pi.shape
    N = frags.states.shape[0]
    taken = F.one_hot(frags.states * A + frags.actions, S * A).sum(1).view(N, S, A).to(pi.dtype)
    visits = F.one_hot(frags.states, S).sum(1).to(pi.dtype)  # (N, S)
    scores = taken - visits[:, :, None] * pi[None]  # Σ_t ∇_θ log π(a_t|s_t) per fragment
    return torch.einsum("n,nsa->sa", _score_weights(phi, pi, inst, frags), scores)


# ---------------------------------------------------------------------------------------------------------------
# SoBiRL and M-SoBiRL
# ---------------------------------------------------------------------------------------------------------------


def truncated_advantage_features(inst: TabularInstance, pi: torch.Tensor) -> torch.Tensor:
    """SoBiRL's one-step truncation of ∇Q − ∇V: ∇r(s,a) − Σ_a' π(a'|s) ∇r(s,a'), (S, A, d). Exact for γ = 0."""
    return inst.features - torch.einsum("sa,sak->sk", pi, inst.features)[:, None, :]


def soft_value_gradients(inst: TabularInstance, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_φ Q*, ∇_φ V*), (S, A, d) and (S, d), at the soft-optimal π = π*_φ (SoBiRL Prop. 5.1).

    ∇V* = (I − γ P_π)⁻¹ Σ_a π(a|·) ∇r(·, a) (the expected discounted reward-gradient sum from each state) and
    ∇Q*(s,a) = ∇r(s,a) + γ Σ_s' P(s'|s,a) ∇V*(s').
    """
    S = inst.P.shape[0]
    eye = torch.eye(S, dtype=inst.P.dtype)
    expected_features = torch.einsum("sa,sak->sk", pi, inst.features)
    dV = torch.linalg.solve(eye - inst.gamma * policy_transition(inst.P, pi), expected_features)
    dQ = inst.features + inst.gamma * torch.einsum("sat,tk->sak", inst.P, dV)
    return dQ, dV


def exact_advantage_features(inst: TabularInstance, pi: torch.Tensor) -> torch.Tensor:
    """∇_φ Q*(s,a) − ∇_φ V*(s) = τ ∇_φ log π*_φ(a|s), (S, A, d): the untruncated implicit direction."""
    dQ, dV = soft_value_gradients(inst, pi)
    return dQ - dV[:, None, :]


def implicit_score_estimator(
    phi: torch.Tensor, pi: torch.Tensor, advantage: torch.Tensor, inst: TabularInstance, frags: Fragments
) -> torch.Tensor:
    """E_{τ_i,τ_j~π}[∇_φ ℓ_ij + ℓ_ij (1/τ) Σ_{t ∈ τ_i ∪ τ_j} advantage(s_t, a_t)], by enumeration, (d,).

    With advantage = ∇Q* − ∇V* at π = π*_φ this is SoBiRL's Prop. 5.2 (exact); with the truncated advantage it is
    the expectation of the practical loss of Algorithm 3 (one-step truncation, temperature τ in place of α).
    """
    C = advantage[frags.states, frags.actions].sum(1)  # (N, d)
    implicit = _score_weights(phi, pi, inst, frags) @ C / inst.tau
    return explicit_gradient(phi, pi, inst, frags) + implicit


def sobirl_practical_gradient(phi: torch.Tensor, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """Expected SoBiRL practical estimator at the exact lower-level solution π*_φ (biased when γ > 0)."""
    _, _, pi = soft_optimal(inst, phi)
    return implicit_score_estimator(phi, pi, truncated_advantage_features(inst, pi), inst, frags)


def sobirl_untruncated_gradient(phi: torch.Tensor, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """The score-function hyper-gradient with the exact ∇Q* − ∇V* (Prop. 5.2): equals ∇F for any γ."""
    _, _, pi = soft_optimal(inst, phi)
    return implicit_score_estimator(phi, pi, exact_advantage_features(inst, pi), inst, frags)


def msobirl_closed_form(phi: torch.Tensor, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """M-SoBiRL's closed form (9) with f(φ, π) = ℓ_up(φ, π), via `agents.exact.soft_mdp.exact_hypergradient`.

    ∇F = ∇_φ f + (1/τ) Σ_{s,a} π*(a|s) ∂f/∂π(a|s) [∇Q*(s,a) − ∇V*(s)], evaluated with one S × S solve.
    """
    return exact_hypergradient(
        inst.P,
        lambda x: reward(inst.features, x),
        lambda x, pi: upper_loss(x, pi, inst, frags),
        phi,
        inst.gamma,
        inst.tau,
        tol=1e-13,
    )


# ---------------------------------------------------------------------------------------------------------------
# PARL: implicit-function hyper-gradient with exact second derivatives
# ---------------------------------------------------------------------------------------------------------------


def optimal_logits(inst: TabularInstance, phi: torch.Tensor) -> torch.Tensor:
    """θ*(φ) = Q*/τ, one maximiser of J(·; φ) (any per-state shift of it is another), (S, A)."""
    Q, _, _ = soft_optimal(inst, phi)
    return Q / inst.tau


def lower_derivatives(theta: torch.Tensor, phi: torch.Tensor, inst: TabularInstance) -> LowerDerivatives:
    """K = −∇²_θθ J and M = ∇²_θφ J at (θ, φ), from one exact float64 Hessian of J over z = (vec θ, φ)."""
    S, A = theta.shape
    n = S * A

    def J(z: torch.Tensor) -> torch.Tensor:
        return lower_objective(z[:n].view(S, A), z[n:], inst)

    H = torch.autograd.functional.hessian(J, torch.cat([theta.detach().flatten(), phi.detach()]))
    return LowerDerivatives(K=-H[:n, :n], M=H[:n, n:])


def implicit_jacobian(
    derivs: LowerDerivatives, num_actions: int, method: str = "pinv", damping: float = 0.0, fixed_action: int = 0
) -> torch.Tensor:
    """dθ*/dφ (SA, d) from ∇_θ J(θ*(φ), φ) = 0, i.e. K dθ*/dφ = M. K is singular, so a gauge must be chosen:

    - "pinv":   K⁺ M, the minimum-norm solution (zero-sum per state). K⁺ is an eigen-pseudo-inverse with
                relative cut-off 1e-10: the S null eigenvalues (per-state shifts, softmax invariance) are at the
                rounding level, the others are O(τ · occupancy).
    - "gauge":  fix θ(s, fixed_action) = 0 for every s; the reduced K is non-singular, solve there, embed with
                zeros. This is the Jacobian of the gauge-fixed maximiser.
    - "damped": (K + λ I)⁻¹ M with λ = damping > 0 (the damped solve of PARL-style implementations); its error is
                O(λ) and it is exact only as λ → 0.

    Any two gauges differ by a per-state constant in each column, which the hyper-gradient never sees since the
    upper gradient g is orthogonal to such shifts.
    """
    K, M = derivs
    n = K.shape[0]
    if method == "pinv":
        return torch.linalg.pinv(K, rtol=1e-10, hermitian=True) @ M
    if method == "gauge":
        free = torch.tensor([i for i in range(n) if i % num_actions != fixed_action])
        jac = torch.zeros_like(M)
        jac[free] = torch.linalg.solve(K[free][:, free], M[free])
        return jac
    if method == "damped":
        if not damping > 0:
            raise ValueError(f"damped solve needs damping > 0, got {damping}")
        return torch.linalg.solve(K + damping * torch.eye(n, dtype=K.dtype), M)
    raise ValueError(f"unknown method {method!r}: use 'pinv', 'gauge' or 'damped'")


def parl_hypergradient(
    phi: torch.Tensor,
    inst: TabularInstance,
    frags: Fragments,
    method: str = "pinv",
    damping: float = 0.0,
    fixed_action: int = 0,
) -> torch.Tensor:
    """PARL's hyper-gradient ∇F = ∇_φ ℓ_up(φ, θ*) + (dθ*/dφ)ᵀ g,  dθ*/dφ = −(∇²_θθ J)⁻¹ ∇²_θφ J = K⁻¹ M,

    where g = ∇_θ ℓ_up(φ, θ) at θ* is the score-function gradient of the upper loss through the fragment
    distribution (`score_function_gradient`). method/damping/fixed_action choose the solve (`implicit_jacobian`).
    """
    theta = optimal_logits(inst, phi)
    pi = torch.softmax(theta, dim=-1)
    jac = implicit_jacobian(lower_derivatives(theta, phi, inst), theta.shape[1], method, damping, fixed_action)
    g = score_function_gradient(phi, pi, inst, frags).flatten()
    return explicit_gradient(phi, pi, inst, frags) + jac.T @ g


# ---------------------------------------------------------------------------------------------------------------
# The corrected A-PARL: Fisher curvature, damping relative to τ, conjugate gradient, untruncated mixed term
# ---------------------------------------------------------------------------------------------------------------

CURVATURES = ("fisher", "hessian")
MIXED_TERMS = ("exact", "one-step")
CURVATURE_STATES = ("occupancy", "uniform")


class CorrectedPARL(NamedTuple):
    """The corrected A-PARL hyper-gradient and its parts."""

    gradient: torch.Tensor  # (d,) explicit + implicit
    explicit: torch.Tensor  # (d,) ∇_φ ℓ_up at fixed π (the cross-entropy's gradient)
    implicit: torch.Tensor  # (d,) Mᵀ v, v = (C + λI)⁻¹ g by conjugate gradient
    cg_iterations: int
    negative_curvature: bool  # CG met pᵀ(C + λI)p ≤ 0 and stopped (never with the Fisher curvature)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int, tol: float = 1e-14
) -> tuple[torch.Tensor, int, bool]:
    """(x, products taken, stopped at negative curvature) for A x = b, A symmetric, from x = 0.

    The same rule as agents/parl.py's solver (written again here: agents/exact imports no algorithm): stop after
    `iterations` products, once ‖r‖ ≤ tol ‖b‖, or at the first direction with pᵀAp ≤ 0 (then x is the last
    iterate).
    """
    x = torch.zeros_like(b)
    if float(b.norm()) == 0.0:
        return x, 0, False
    r, p = b.clone(), b.clone()
    rs = r @ r
    for done in range(1, iterations + 1):
        Ap = matvec(p)
        curvature = p @ Ap
        if float(curvature) <= 0.0:
            return x, done, True
        step = rs / curvature
        x, r = x + step * p, r - step * Ap
        rs_new = r @ r
        if float(rs_new.sqrt()) <= tol * float(b.norm()):
            return x, done, False
        p, rs = r + (rs_new / rs) * p, rs_new
    return x, iterations, False


def occupancy_weights(inst: TabularInstance, pi: torch.Tensor) -> torch.Tensor:
    """w(s) = (1 − γ) d_π(s): the discounted state occupancy from ρ0, normalised to a distribution, (S,).

    The exact lower objective J = ρ0·V^π weighs each state's policy gradient by d_π(s); normalised, its curvature is
    a mean over states like the SAC actor objective's (agents/parl.py), and the factor 1/(1 − γ) cancels in K⁻¹M.
    """
    return (1 - inst.gamma) * state_occupancy(inst.P, pi, inst.rho0, inst.gamma)


def fisher_curvature(pi: torch.Tensor, weights: torch.Tensor, tau: float) -> torch.Tensor:
    """C_F = τ Σ_s w(s) J_zᵀ (diag π_s − π_s π_sᵀ) J_z over tabular logits (J_z = I), (SA, SA) block-diagonal.

    The Gauss–Newton (Fisher) form of −∇²_θ of the entropy-regularised objective: positive semi-definite for every
    π (null only along per-state logit shifts), and equal to −(1 − γ)∇²_θθ J exactly at a soft optimum, where the
    other chain-rule term multiplies ∂J/∂z = 0.
    """
    blocks = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]  # (S, A, A)
    return tau * torch.block_diag(*(weights[:, None, None] * blocks))


def mixed_jacobian(inst: TabularInstance, pi: torch.Tensor, weights: torch.Tensor, form: str = "exact") -> torch.Tensor:
    """M(s·A + a, :) = w(s) π(a|s) (∇_φQ^π(s,a) − ∇_φV^π(s)), (SA, d): ∇²_θφ of the soft objective.

    With w = (1 − γ) d_π it is (1 − γ) ∇²_θφ J exactly, for any π: the policy gradient of J is
    d_π(s)(diag π_s − π_s π_sᵀ)(Q^π(s,·) − τ log π_s), and only Q^π depends on φ, through policy evaluation
    (`soft_value_gradients` at this π). It is also the expectation of PARL's eq. (17), untruncated, on trajectories
    from ρ0. form="one-step" replaces ∇Q^π − ∇V^π by ∇r − Σ_a' π ∇r (SoBiRL's truncation in (78)).
    """
    if form == "exact":
        dQ, dV = soft_value_gradients(inst, pi)
        advantage = dQ - dV[:, None, :]
    elif form == "one-step":
        advantage = truncated_advantage_features(inst, pi)
    else:
        raise ValueError(f"unknown mixed term {form!r}: use one of {', '.join(MIXED_TERMS)}")
    return (weights[:, None, None] * pi[:, :, None] * advantage).reshape(-1, advantage.shape[-1])


def corrected_parl_hypergradient(
    phi: torch.Tensor,
    inst: TabularInstance,
    frags: Fragments,
    *,
    theta: torch.Tensor | None = None,
    damping_relative: float = 1e-3,
    cg_iters: int = 30,
    curvature: str = "fisher",
    mixed: str = "exact",
    curvature_states: str = "occupancy",
) -> CorrectedPARL:
    """The corrected A-PARL hyper-gradient ∇_φ ℓ_up + Mᵀ v, (C + λI) v = g, at logits θ (default θ* = Q*/τ):

    - curvature="fisher": C = τ Σ_s w(s)(diag π_s − π_s π_sᵀ) (`fisher_curvature`), positive semi-definite, so the
      solve never meets negative curvature; "hessian": C = −(1 − γ)∇²_θθ J, PARL's own (indefinite away from θ*).
    - λ = damping_relative · τ, damping relative to the temperature that scales C.
    - v by `cg_iters` conjugate-gradient products (the system has S·A unknowns: 20–50 products converge).
    - M: `mixed_jacobian` ("exact": the untruncated mixed term; "one-step": (78)'s truncation).
    - g = ∇_θ ℓ_up (`score_function_gradient`, exact on-policy expectation over all fragment pairs), and the states
      of C and M weighted by w = (1 − γ) d_π, as the exact objective weighs them; curvature_states="uniform" gives
      the Fisher curvature uniform state weights instead (M keeps w): the mismatch of K and M from different
      states (agents/parl.py's replay states against the pairs' fragments).
    At θ* with the Fisher curvature and exact M this is PARL's implicit-function gradient, equal to ∇F up to the
    O(λ) damping bias and the CG residual.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}: use one of {', '.join(CURVATURES)}")
    if curvature_states not in CURVATURE_STATES:
        raise ValueError(f"unknown curvature states {curvature_states!r}: use one of {', '.join(CURVATURE_STATES)}")
    if theta is None:
        theta = optimal_logits(inst, phi)
    pi = torch.softmax(theta, dim=-1)
    weights = occupancy_weights(inst, pi)
    curvature_weights = weights if curvature_states == "occupancy" else torch.full_like(weights, 1 / len(weights))
    if curvature == "fisher":
        C = fisher_curvature(pi, curvature_weights, inst.tau)
    elif curvature_states == "occupancy":
        C = (1 - inst.gamma) * lower_derivatives(theta, phi, inst).K
    else:
        raise ValueError("the Hessian curvature is that of J itself: its states are weighted by the occupancy")
    lam = damping_relative * inst.tau
    g = score_function_gradient(phi, pi, inst, frags).flatten()
    v, iterations, negative = conjugate_gradient(lambda u: C @ u + lam * u, g, cg_iters)
    implicit = mixed_jacobian(inst, pi, weights, mixed).T @ v
    explicit = explicit_gradient(phi, pi, inst, frags)
    return CorrectedPARL(explicit + implicit, explicit, implicit, iterations, negative)


# ---------------------------------------------------------------------------------------------------------------
# Penalty methods (Gaur et al. 2024 after Kwon et al.; PBRL)
# ---------------------------------------------------------------------------------------------------------------


def penalised_logits(
    phi: torch.Tensor,
    sigma: float,
    inst: TabularInstance,
    frags: Fragments,
    theta0: torch.Tensor | None = None,
    tol: float = 1e-12,
    max_steps: int = 100,
) -> torch.Tensor:
    """λ'_σ(φ) = argmax_λ Ψ(λ) = J(λ; φ) − σ ℓ_up(φ, softmax λ), by Newton's method, (S, A).

    Starts at θ0 (default θ*(φ) = Q*/τ, the σ = 0 solution). Each step is λ ← λ + t (−∇²Ψ)⁺ ∇Ψ with exact
    autograd derivatives and the pseudo-inverse (Ψ is invariant to per-state shifts too, so the iterates stay in
    θ0 + range); t halves until ‖∇Ψ‖ decreases, and a plain gradient step replaces a Newton step that is not an
    ascent direction. Stops when ‖∇Ψ‖_∞ < tol; raises RuntimeError after max_steps.
    """
    lam = (optimal_logits(inst, phi) if theta0 is None else theta0).detach().flatten().clone()
    S, A = inst.P.shape[:2]
    phi = phi.detach()

    def psi(z: torch.Tensor) -> torch.Tensor:
        theta = z.view(S, A)
        return lower_objective(theta, phi, inst) - sigma * upper_loss(phi, torch.softmax(theta, -1), inst, frags)

    def grad(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        (gz,) = torch.autograd.grad(psi(z), z)
        return gz

    g = grad(lam)
    for _ in range(max_steps):
        if g.abs().max() < tol:
            return lam.view(S, A)
        hess = torch.autograd.functional.hessian(psi, lam)
        step = torch.linalg.pinv(-hess, rtol=1e-10, hermitian=True) @ g
        if step @ g <= 0:
            step = g
        t = 1.0
        for _ in range(60):
            candidate = lam + t * step
            g_candidate = grad(candidate)
            if g_candidate.norm() < g.norm():
                break
            t *= 0.5
        lam, g = candidate, g_candidate
    if g.abs().max() < tol:
        return lam.view(S, A)
    raise RuntimeError(
        f"Newton did not reach ‖∇Ψ‖ < {tol} in {max_steps} steps (σ = {sigma}, ‖∇Ψ‖ = {g.abs().max():.3g})"
    )


def penalty_value(phi: torch.Tensor, sigma: float, inst: TabularInstance, frags: Fragments) -> torch.Tensor:
    """L_σ(φ) = ℓ_up(φ, λ'_σ) + (J(λ*; φ) − J(λ'_σ; φ))/σ = (max_λ J − max_λ [J − σ ℓ_up]) / σ.

    L_σ → F as σ → 0 (F(φ) = ℓ_up(φ, λ*)), with L_σ = F − (σ/2) gᵀK⁺g + O(σ²).
    """
    theta_star = optimal_logits(inst, phi)
    lam = penalised_logits(phi, sigma, inst, frags, theta_star)
    J_star = lower_objective(theta_star, phi, inst)
    J_pen = lower_objective(lam, phi, inst)
    return upper_loss(phi, torch.softmax(lam, -1), inst, frags) + (J_star - J_pen) / sigma


def penalty_gradient(
    phi: torch.Tensor, sigma: float, inst: TabularInstance, frags: Fragments, form: str = "kwon"
) -> torch.Tensor:
    """First-order penalty hyper-gradient, (d,); the J-gradients are E_π[Σ_t γ^t ∇r] (`value_reward_gradient`).

    form="kwon":  ∇_φ ℓ_up(φ, λ'_σ) + (∇_φ J(λ*, φ) − ∇_φ J(λ'_σ, φ))/σ. By Danskin's theorem this is exactly ∇L_σ
                  (`penalty_value`); it is PBRL's reward update (upper loss at the penalised policy, value-penalty
                  gradient difference with λ = 1/σ) and Kwon et al.'s. Its error against ∇F is O(σ).
    form="seed":  ∇_φ ℓ_up(φ, λ*) + (the same difference)/σ: Gaur et al.'s eq. (11) as printed, the upper loss at
                  the lower-level optimum. Also O(σ), but not the gradient of any penalty function.
    """
    theta_star = optimal_logits(inst, phi)
    pi_star = torch.softmax(theta_star, -1)
    pi_pen = torch.softmax(penalised_logits(phi, sigma, inst, frags, theta_star), -1)
    difference = (value_reward_gradient(inst, pi_star) - value_reward_gradient(inst, pi_pen)) / sigma
    if form == "kwon":
        return explicit_gradient(phi, pi_pen, inst, frags) + difference
    if form == "seed":
        return explicit_gradient(phi, pi_star, inst, frags) + difference
    raise ValueError(f"unknown form {form!r}: use 'kwon' or 'seed'")


# ---------------------------------------------------------------------------------------------------------------
# AIHF's demonstration term
# ---------------------------------------------------------------------------------------------------------------


def demonstration_log_likelihood(phi: torch.Tensor, expert_pi: torch.Tensor, inst: TabularInstance) -> torch.Tensor:
    """L1(φ) = Σ_{s,a} d_E(s,a) log π*_φ(a|s) = E_{τ~π_E}[Σ_t γ^t log π*_φ(a_t|s_t)], s_0 ~ ρ0.

    The soft MDP's temperature is AIHF's KL coefficient β (= inst.tau, uniform reference policy), and its discount
    is the demonstration likelihood's γ.
    """
    d_expert = occupancy(inst.P, expert_pi, inst.rho0, inst.gamma)
    Q, V, _ = soft_optimal(inst, phi)
    return (d_expert * (Q - V[:, None]) / inst.tau).sum()


def demonstration_gradient(phi: torch.Tensor, expert_pi: torch.Tensor, inst: TabularInstance) -> torch.Tensor:
    """∇L1 = (1/β)(E_{π_E}[Σ_t γ^t ∇r(s_t,a_t)] − E_{π*_φ}[Σ_t γ^t ∇r(s_t,a_t)]), both from ρ0 (AIHF Lemma 4.1).

    Why: log π* = (Q* − V*)/β, ∇Q* = ∇r + γP∇V*, and d_E satisfies d_E(s') = ρ0(s') + γ Σ_{s,a} d_E(s,a)P(s'|s,a),
    so Σ d_E (∇Q* − ∇V*) = Σ d_E ∇r − ρ0·∇V*, and ρ0·∇V* = Σ d_{π*} ∇r.
    """
    _, _, pi = soft_optimal(inst, phi)
    return (value_reward_gradient(inst, expert_pi) - value_reward_gradient(inst, pi)) / inst.tau


# ---------------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------------


def relative_error(g: torch.Tensor, reference: torch.Tensor) -> float:
    """‖g − g_ref‖₂ / ‖g_ref‖₂."""
    return float((g - reference).norm() / reference.norm())


def cosine_similarity(g: torch.Tensor, reference: torch.Tensor) -> float:
    """⟨g, g_ref⟩ / (‖g‖₂ ‖g_ref‖₂)."""
    return float(g @ reference / (g.norm() * reference.norm()))
