"""Exact tabular checks of bilevel-RL hyper-gradients against finite differences of the true hyper-objective.

One seeded soft MDP (S=3, A=2, d=4 reward features, fragments of H=2 steps, all 36² fragment pairs enumerated);
every expectation is a finite sum, so each method's gradient is a number that can be compared, not sampled. The
corrected A-PARL is checked on 8 MDPs with action-dependent transitions (S=4, A=3, d=8, H=2) at γ = 0.9 and 0.99.
"""

from __future__ import annotations

import math

import pytest
import torch

from agents.exact.tabular_bilevel import (
    central_difference,
    conjugate_gradient,
    corrected_parl_hypergradient,
    cosine_similarity,
    demonstration_gradient,
    demonstration_log_likelihood,
    enumerate_fragments,
    exact_advantage_features,
    explicit_gradient,
    fisher_curvature,
    hyper_objective,
    implicit_jacobian,
    implicit_score_estimator,
    lower_derivatives,
    lower_objective,
    make_instance,
    mixed_jacobian,
    msobirl_closed_form,
    occupancy_weights,
    optimal_logits,
    parl_hypergradient,
    penalised_logits,
    penalty_gradient,
    penalty_value,
    relative_error,
    score_function_gradient,
    sobirl_practical_gradient,
    sobirl_untruncated_gradient,
    soft_optimal,
    soft_value_gradients,
    state_occupancy,
    truncated_advantage_features,
    upper_loss,
)

pytestmark = pytest.mark.usefixtures("single_thread")

GAMMA, TAU, HORIZON = 0.5, 0.7, 2
EXACT = 1e-6  # relative error allowed against central differences (they reach ~1e-10 here)
SIGMAS = (0.1, 0.05, 0.025, 0.0125)


def instance(gamma: float = GAMMA, **kwargs):
    inst = make_instance(gamma=gamma, tau=TAU, seed=0, **kwargs)
    return inst, enumerate_fragments(inst, HORIZON)


def fd_truth(inst, frags) -> torch.Tensor:
    return central_difference(lambda x: hyper_objective(x, inst, frags), inst.phi, 1e-5)


@pytest.fixture(scope="module")
def problem():
    inst, frags = instance()
    return inst, frags, fd_truth(inst, frags)


def log_log_slope(xs, ys) -> float:
    """Least-squares slope of log y against log x."""
    lx = torch.tensor([math.log(x) for x in xs], dtype=torch.float64)
    ly = torch.tensor([math.log(y) for y in ys], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float(lx @ ly / (lx @ lx))


# ---------------------------------------------------------------------------------------------------------------
# The pieces


def test_finite_differences_are_converged(problem):
    inst, frags, fd = problem
    finer = central_difference(lambda x: hyper_objective(x, inst, frags), inst.phi, 1e-6)
    assert relative_error(finer, fd) < 1e-8
    assert fd.norm() > 0.1


def test_soft_optimal_logits_maximise_the_soft_value(problem):
    inst, _, _ = problem
    Q, V, pi = soft_optimal(inst, inst.phi)
    theta = optimal_logits(inst, inst.phi).requires_grad_(True)
    J = lower_objective(theta, inst.phi, inst)
    (grad,) = torch.autograd.grad(J, theta)
    assert grad.abs().max() < 1e-13
    torch.testing.assert_close(J.detach(), inst.rho0 @ V, rtol=1e-14, atol=1e-14)
    # The Hessian is singular exactly along per-state logit shifts, and negative definite elsewhere.
    K = lower_derivatives(theta.detach(), inst.phi, inst).K
    eigenvalues = torch.linalg.eigvalsh(K)
    assert eigenvalues[:3].abs().max() < 1e-13
    assert eigenvalues[3:].min() > 1e-2
    shifts = torch.zeros(3, 2, dtype=torch.float64)
    shifts[1] = 1.0
    assert (K @ shifts.flatten()).abs().max() < 1e-13


def test_state_occupancy_is_the_discounted_visit_series(problem):
    inst, _, _ = problem
    _, _, pi = soft_optimal(inst, inst.phi)
    P_pi = torch.einsum("sat,sa->st", inst.P, pi)
    series, visit = torch.zeros(3, dtype=torch.float64), inst.rho0.clone()
    for t in range(200):  # 0.5^200 is far below rounding
        series += GAMMA**t * visit
        visit = visit @ P_pi
    torch.testing.assert_close(state_occupancy(inst.P, pi, inst.rho0, GAMMA), series, rtol=1e-13, atol=1e-15)


def test_explicit_and_score_function_gradients_equal_autograd(problem):
    inst, frags, _ = problem
    theta = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    phi = inst.phi.clone().requires_grad_(True)
    theta_leaf = theta.clone().requires_grad_(True)
    grad_phi, grad_theta = torch.autograd.grad(
        upper_loss(phi, torch.softmax(theta_leaf, -1), inst, frags), (phi, theta_leaf)
    )
    pi = torch.softmax(theta, -1)
    torch.testing.assert_close(explicit_gradient(inst.phi, pi, inst, frags), grad_phi, rtol=1e-12, atol=1e-14)
    g = score_function_gradient(inst.phi, pi, inst, frags)
    torch.testing.assert_close(g, grad_theta, rtol=1e-12, atol=1e-14)
    assert g.sum(1).abs().max() < 1e-15  # orthogonal to per-state shifts


# ---------------------------------------------------------------------------------------------------------------
# SoBiRL and M-SoBiRL


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_msobirl_closed_form_equals_finite_differences(gamma):
    inst, frags = instance(gamma)
    fd = fd_truth(inst, frags)
    assert relative_error(msobirl_closed_form(inst.phi, inst, frags), fd) < EXACT
    assert relative_error(sobirl_untruncated_gradient(inst.phi, inst, frags), fd) < EXACT


def test_sobirl_practical_estimator_is_exact_without_discount():
    inst, frags = instance(gamma=0.0)
    fd = fd_truth(inst, frags)
    assert relative_error(sobirl_practical_gradient(inst.phi, inst, frags), fd) < EXACT
    # without its implicit term the estimator misses the policy's dependence on φ
    _, _, pi = soft_optimal(inst, inst.phi)
    assert relative_error(explicit_gradient(inst.phi, pi, inst, frags), fd) > 0.1


def test_sobirl_practical_estimator_is_biased_with_discount(problem):
    """The truncation drops γ[(P∇V*)(s,a) − Σ_a' π(a'|s)(P∇V*)(s,a')]: biased, but still well aligned here."""
    inst, frags, fd = problem
    practical = sobirl_practical_gradient(inst.phi, inst, frags)
    assert 1e-2 < relative_error(practical, fd) < 0.1  # 4.5e-2 on this instance
    assert cosine_similarity(practical, fd) > 0.99


def test_sobirl_practical_estimator_is_exact_when_transitions_ignore_the_action():
    """The dropped term compares next-state distributions across actions; with P(s'|s, a) = P(s'|s) it vanishes."""
    inst, _ = instance(gamma=0.9)
    inst = inst._replace(P=inst.P[:, :1].expand_as(inst.P).contiguous())
    frags = enumerate_fragments(inst, HORIZON)
    fd = fd_truth(inst, frags)
    assert relative_error(sobirl_practical_gradient(inst.phi, inst, frags), fd) < EXACT


# ---------------------------------------------------------------------------------------------------------------
# PARL


def test_parl_pseudo_inverse_hypergradient_equals_finite_differences(problem):
    inst, frags, fd = problem
    assert relative_error(parl_hypergradient(inst.phi, inst, frags, "pinv"), fd) < EXACT


def test_parl_is_gauge_independent(problem):
    inst, frags, fd = problem
    theta = optimal_logits(inst, inst.phi)
    derivs = lower_derivatives(theta, inst.phi, inst)
    jacobians = [implicit_jacobian(derivs, 2, "pinv")] + [
        implicit_jacobian(derivs, 2, "gauge", fixed_action=a) for a in (0, 1)
    ]
    # SoBiRL's ∇Q*/τ (the Jacobian of θ* = Q*/τ) is one more gauge: it solves K J = M too.
    dQ, _ = soft_value_gradients(inst, torch.softmax(theta, -1))
    jacobians.append((dQ / inst.tau).reshape(6, -1))
    for jac in jacobians:
        torch.testing.assert_close(derivs.K @ jac, derivs.M, rtol=0, atol=1e-13)
    reference = jacobians[0].view(3, 2, -1)
    for jac in jacobians[1:]:
        gap = jac.view(3, 2, -1) - reference
        assert gap.abs().max() > 0.1  # genuinely different Jacobians ...
        assert (gap - gap[:, :1]).abs().max() < 1e-12  # ... differing only by a per-state shift of the logits
    grads = [parl_hypergradient(inst.phi, inst, frags, "pinv")]
    grads += [parl_hypergradient(inst.phi, inst, frags, "gauge", fixed_action=a) for a in (0, 1)]
    for g in grads[1:]:
        assert relative_error(g, grads[0]) < 1e-12
    assert relative_error(grads[0], fd) < EXACT


def test_parl_damping_error_vanishes_linearly(problem):
    inst, frags, fd = problem
    dampings = (1e-2, 1e-3, 1e-4, 1e-5)
    errors = [relative_error(parl_hypergradient(inst.phi, inst, frags, "damped", damping=lam), fd) for lam in dampings]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert abs(log_log_slope(dampings, errors) - 1.0) < 0.05
    assert errors[0] > 1e-2 and errors[-1] < 1e-4
    with pytest.raises(ValueError, match="damping"):
        parl_hypergradient(inst.phi, inst, frags, "damped", damping=0.0)


# ---------------------------------------------------------------------------------------------------------------
# The corrected A-PARL (issue 34): Fisher curvature, damping relative to τ, CG, untruncated mixed term, on MDPs whose
# transitions depend strongly on the action (rows softmax(6·N(0, 1))), S = 4, A = 3, d = 8, H = 2, τ = 0.7.

AD_SEEDS = range(8)


def action_dependent(seed: int, gamma: float):
    inst = make_instance(4, 3, 8, gamma, TAU, seed, transitions="action-dependent")
    return inst, enumerate_fragments(inst, HORIZON)


@pytest.fixture(scope="module", params=[0.9, 0.99], ids=lambda gamma: f"gamma={gamma}")
def action_dependent_cases(request):
    """(instance, fragments, π*, ∇F) for the 8 seeds at one γ; ∇F is Prop. 5.2 with the exact ∇Q* − ∇V* (equal to
    the closed form (9) and to finite differences: the tests above and the check below)."""
    cases = []
    for seed in AD_SEEDS:
        inst, frags = action_dependent(seed, request.param)
        _, _, pi = soft_optimal(inst, inst.phi)
        truth = implicit_score_estimator(inst.phi, pi, exact_advantage_features(inst, pi), inst, frags)
        cases.append((inst, frags, pi, truth))
    return cases


def corrected_cosines(cases, **options) -> tuple[list[float], list[float]]:
    """(whole-gradient cosines, implicit-part cosines) of `corrected_parl_hypergradient(**options)` to ∇F."""
    whole, implicit = [], []
    for inst, frags, pi, truth in cases:
        out = corrected_parl_hypergradient(inst.phi, inst, frags, theta=torch.log(pi), **options)
        whole.append(cosine_similarity(out.gradient, truth))
        implicit.append(cosine_similarity(out.implicit, truth - out.explicit))
    return whole, implicit


def test_action_dependent_instances_are_seeded_and_peaked():
    inst, _ = action_dependent(3, 0.9)
    again, _ = action_dependent(3, 0.99)
    assert torch.equal(inst.P, again.P) and torch.equal(inst.phi, again.phi)  # γ does not change the draws
    torch.testing.assert_close(inst.P.sum(-1), torch.ones(4, 3, dtype=torch.float64))
    assert inst.P.max(-1).values.mean() > 0.6  # mostly one next state per (s, a) ...
    assert (inst.P.argmax(-1) != inst.P.argmax(-1)[:, :1]).any()  # ... which depends on the action
    assert torch.equal(make_instance(seed=0).P, make_instance(seed=0, transitions="dense").P)  # default unchanged
    with pytest.raises(ValueError, match="transitions"):
        make_instance(transitions="sparse")


def test_the_exact_reference_on_action_dependent_instances_is_the_closed_form():
    """The reference ∇F of the tests below (Prop. 5.2, exact ∇Q* − ∇V*) against the closed form (9)
    (`exact_hypergradient`) on one instance at γ = 0.99."""
    inst, frags = action_dependent(7, 0.99)
    _, _, pi = soft_optimal(inst, inst.phi)
    truth = implicit_score_estimator(inst.phi, pi, exact_advantage_features(inst, pi), inst, frags)
    assert relative_error(truth, msobirl_closed_form(inst.phi, inst, frags)) < 1e-9


def test_corrected_parl_reaches_the_exact_hypergradient_where_the_truncation_fails(action_dependent_cases):
    """The corrected A-PARL (Fisher curvature, λ = 1e-3·τ, 30 CG products, exact mixed term, states weighted by the
    normalised occupancy) has cosine ≥ 0.95 to ∇F on all 8 instances, whole gradient and implicit part, while
    SoBiRL's one-step truncation (78) falls below 0.5 on at least one. Measured (seeds 0–7): corrected ≥ 0.985
    (whole), ≥ 0.96 (implicit); (78) whole down to 0.470 (γ = 0.9) and 0.428 (γ = 0.99), its implicit part to
    −0.663 and 0.177. Broken variants it catches, each run here: the one-step mixed term (down to 0.47 / 0.42),
    the Fisher curvature on uniformly weighted states while M keeps the occupancy (down to 0.51), and PARL's
    absolute damping 0.1 in place of 1e-3·τ (down to 0.69)."""
    whole, implicit = corrected_cosines(action_dependent_cases)
    assert min(whole) >= 0.95 and min(implicit) >= 0.95, (whole, implicit)
    truncated_whole, truncated_implicit = [], []
    for inst, frags, pi, truth in action_dependent_cases:
        practical = implicit_score_estimator(inst.phi, pi, truncated_advantage_features(inst, pi), inst, frags)
        explicit = explicit_gradient(inst.phi, pi, inst, frags)
        truncated_whole.append(cosine_similarity(practical, truth))
        truncated_implicit.append(cosine_similarity(practical - explicit, truth - explicit))
    assert min(truncated_whole) < 0.5 and min(truncated_implicit) < 0.5, (truncated_whole, truncated_implicit)
    for broken in (dict(mixed="one-step"), dict(curvature_states="uniform"), dict(damping_relative=0.1 / TAU)):
        assert min(corrected_cosines(action_dependent_cases, **broken)[0]) < 0.8, broken


def test_fisher_curvature_is_minus_the_hessian_at_the_soft_optimum_and_positive_semi_definite_elsewhere():
    """At θ* the Fisher form τ Σ_s w(s)(diag π_s − π_s π_sᵀ) equals −(1 − γ)∇²_θθ J exactly, and the closed-form
    mixed Jacobian equals (1 − γ)∇²_θφ J at any θ. Away from θ* the Hessian is indefinite and CG on it stops at
    negative curvature within a few products, while the Fisher form stays PSD and CG runs to convergence. Breaks
    if the Fisher form dropped the −ππᵀ term, the factor τ or the occupancy weights, or if the mixed term used
    ∇r in place of ∇Q^π."""
    inst, frags = action_dependent(0, 0.9)
    theta = optimal_logits(inst, inst.phi)
    pi = torch.softmax(theta, -1)
    derivs = lower_derivatives(theta, inst.phi, inst)
    weights = occupancy_weights(inst, pi)
    scale = 1 - inst.gamma
    torch.testing.assert_close(fisher_curvature(pi, weights, inst.tau), scale * derivs.K, rtol=0, atol=1e-14)
    torch.testing.assert_close(mixed_jacobian(inst, pi, weights), scale * derivs.M, rtol=0, atol=1e-14)
    for seed in (0, 2):
        away = theta + torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        pi_away = torch.softmax(away, -1)
        weights_away = occupancy_weights(inst, pi_away)
        derivs_away = lower_derivatives(away, inst.phi, inst)
        torch.testing.assert_close(
            mixed_jacobian(inst, pi_away, weights_away), scale * derivs_away.M, rtol=0, atol=1e-14
        )
        assert torch.linalg.eigvalsh(scale * derivs_away.K).min() < -1e-2
        assert torch.linalg.eigvalsh(fisher_curvature(pi_away, weights_away, inst.tau)).min() > -1e-15
        hessian = corrected_parl_hypergradient(inst.phi, inst, frags, theta=away, curvature="hessian")
        fisher = corrected_parl_hypergradient(inst.phi, inst, frags, theta=away)
        assert hessian.negative_curvature and hessian.cg_iterations <= 3
        assert not fisher.negative_curvature and fisher.cg_iterations >= 8
    with pytest.raises(ValueError, match="curvature"):
        corrected_parl_hypergradient(inst.phi, inst, frags, curvature="gauss")


def test_tabular_conjugate_gradient_solves_and_stops_at_negative_curvature():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = B @ B.T + 0.1 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, iterations, negative = conjugate_gradient(lambda v: A @ v, b, 50)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)
    assert not negative and iterations <= 8
    x, iterations, negative = conjugate_gradient(lambda v: -v, b, 50)
    assert negative and iterations == 1 and x.abs().max() == 0


# ---------------------------------------------------------------------------------------------------------------
# Penalty methods


def test_penalised_policy_is_stationary_and_moves_with_sigma(problem):
    inst, frags, _ = problem
    theta_star = optimal_logits(inst, inst.phi)
    lam = penalised_logits(inst.phi, 0.05, inst, frags).requires_grad_(True)
    psi = lower_objective(lam, inst.phi, inst) - 0.05 * upper_loss(inst.phi, torch.softmax(lam, -1), inst, frags)
    (grad,) = torch.autograd.grad(psi, lam)
    assert grad.abs().max() < 1e-12
    moved = torch.softmax(lam.detach(), -1) - torch.softmax(theta_star, -1)
    assert 1e-4 < moved.abs().max() < 0.1


def test_kwon_penalty_gradient_is_the_exact_gradient_of_the_penalty_function(problem):
    """Danskin: the PBRL / Kwon form differentiates L_σ exactly; Gaur et al.'s printed form does not."""
    inst, frags, _ = problem
    sigma = 0.05
    fd_penalty = central_difference(lambda x: penalty_value(x, sigma, inst, frags), inst.phi, 1e-5)
    assert relative_error(penalty_gradient(inst.phi, sigma, inst, frags, "kwon"), fd_penalty) < EXACT
    assert relative_error(penalty_gradient(inst.phi, sigma, inst, frags, "seed"), fd_penalty) > 1e-3


def test_penalty_value_approaches_the_hyper_objective_from_below(problem):
    """L_σ = F − (σ/2) gᵀK⁺g + O(σ²), with PARL's g and K: the penalty's bias is the implicit term's curvature."""
    inst, frags, _ = problem
    theta = optimal_logits(inst, inst.phi)
    K = lower_derivatives(theta, inst.phi, inst).K
    g = score_function_gradient(inst.phi, torch.softmax(theta, -1), inst, frags).flatten()
    half_curvature = 0.5 * g @ torch.linalg.pinv(K, rtol=1e-10, hermitian=True) @ g
    F0 = hyper_objective(inst.phi, inst, frags)
    sigma = 1e-3
    gap = (F0 - penalty_value(inst.phi, sigma, inst, frags)) / sigma
    assert half_curvature > 1e-2
    assert abs(gap / half_curvature - 1) < 1e-3


@pytest.mark.parametrize("form", ["kwon", "seed"])
def test_penalty_gradient_error_is_linear_in_sigma(problem, form):
    inst, frags, fd = problem
    grads = [penalty_gradient(inst.phi, sigma, inst, frags, form) for sigma in SIGMAS]
    errors = [relative_error(g, fd) for g in grads]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert abs(log_log_slope(SIGMAS, errors) - 1.0) < 0.1
    assert errors[-1] < 5e-3
    # the O(σ) term is the whole error: Richardson extrapolation 2 g(σ/2) − g(σ) cancels it
    richardson = 2 * grads[-1] - grads[-2]
    assert relative_error(richardson, fd) < 0.05 * errors[-1]


def test_penalty_forms_differ_at_order_sigma(problem):
    inst, frags, _ = problem
    gaps = [
        relative_error(
            penalty_gradient(inst.phi, s, inst, frags, "seed"), penalty_gradient(inst.phi, s, inst, frags, "kwon")
        )
        for s in SIGMAS
    ]
    assert gaps[0] > 1e-3
    assert abs(log_log_slope(SIGMAS, gaps) - 1.0) < 0.1


# ---------------------------------------------------------------------------------------------------------------
# AIHF


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9])
def test_aihf_demonstration_gradient_equals_finite_differences(gamma):
    inst, _ = instance(gamma)
    expert = torch.softmax(torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64), -1)
    fd = central_difference(lambda x: demonstration_log_likelihood(x, expert, inst), inst.phi, 1e-5)
    analytic = demonstration_gradient(inst.phi, expert, inst)
    assert relative_error(analytic, fd) < EXACT
    # the 1/β is needed: the same difference without it (AIHF's eq. 18 as printed) is off by the factor β
    assert relative_error(analytic * inst.tau, fd) == pytest.approx(1 - inst.tau, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The comparison script


def test_compare_script_table(capsys):
    from sobirl.tabular_compare import main

    table = main(["--seed", "0"])
    assert capsys.readouterr().out.strip().endswith(table)
    rows = {}
    for line in table.splitlines()[2:]:
        name, error, cosine = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = (float(error), float(cosine))
    assert len(rows) == 10
    assert rows["finite differences (truth)"] == (0.0, 1.0)
    for name in ("M-SoBiRL closed form (9)", "PARL, pseudo-inverse Hessian"):
        assert rows[name][0] < EXACT
    kwon = [rows[f"penalty σ = {s} (Kwon / PBRL: ℓ at λ'_σ)"][0] for s in ("0.1", "0.01", "0.001")]
    assert kwon[0] > kwon[1] > kwon[2]
    assert 1e-2 < rows["SoBiRL practical (one-step truncation)"][0] < 0.1


def test_compare_script_rejects_bad_flags(capsys):
    from sobirl.tabular_compare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--gamma", "1.0"])
    assert exit_info.value.code == 2
    assert "--gamma" in capsys.readouterr().err
