"""The corrected A-PARL's flags (issue 34 item 3; agents/parl.py): Fisher curvature, damping relative to alpha,
curvature on the pairs' states, the mixed term through SAC's reward clamp, a cap on the implicit part, and the
off-policy correction of the mixed term's scores. Each test names the broken variant it catches; the dense reference
formulas are tests/test_parl.py's, written out with autograd Hessians over tabular actors and rewards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents import parl
from agents.exact.tabular_bilevel import relative_error
from agents.feedback.pairs import pair_observations
from agents.infra.cli import parse_args, run_cli
from sobirl import beamrider
from tests.conftest import SHORT_PHASES, only_run_dir, run_script, scalar_tags, tiny_preference_flags
from tests.conftest import TableModule as Table
from tests.test_parl import (
    ALPHA,
    DAMPING,
    DTYPE,
    S,
    dense_expected_gradient,
    loss_inputs,
    make_parl_loss,
    paper_mixed_jacobian,
    tabular_case,
)

pytestmark = pytest.mark.usefixtures("single_thread")

FORMS = ["paper", "one-step"]


def reward_gradient(loss_fn: parl.PARLLoss, pairs, reward: nn.Module) -> tuple[torch.Tensor, dict]:
    """(d loss / d reward table, flat; the loss's metrics) on one minibatch."""
    reward.table.grad = None
    loss, metrics = loss_fn(loss_inputs(pairs, reward))
    loss.backward()
    return reward.table.grad.flatten().clone(), metrics


def pair_states(pairs) -> torch.Tensor:
    return pair_observations(pairs.frames1, pairs.frames2, pairs.actions1.shape[1])


def never_sampled(generator: torch.Generator) -> torch.Tensor:
    raise AssertionError("--curvature-states pairs must not draw replay states")


# ---------------------------------------------------------------------------------------------------------------
# --parl-curvature fisher


@pytest.mark.parametrize("mixed", FORMS)
def test_fisher_curvature_equals_the_hessian_at_the_soft_optimum(mixed):
    """With the actor at the per-state soft optimum (logits = Q / alpha), the Fisher form alpha E_s[J_z^T (diag pi -
    pi pi^T) J_z] is exactly -d2J/dtheta2, so the whole reward gradient equals the Hessian one. Breaks if the
    Fisher products dropped the -pi pi^T term, the factor alpha or the mean over states (1/N)."""
    q_table, _, reward, replay_states, pairs = tabular_case()
    actor = Table(q_table / ALPHA)
    hessian, _ = reward_gradient(make_parl_loss(q_table, actor, replay_states, mixed=mixed), pairs, reward)
    fisher, metrics = reward_gradient(
        make_parl_loss(q_table, actor, replay_states, mixed=mixed, curvature="fisher"), pairs, reward
    )
    torch.testing.assert_close(fisher, hessian, rtol=1e-9, atol=1e-12)
    assert float(metrics["cg_residual"]) < 1e-10 and float(metrics["cg_negative_curvature"]) == 0


@pytest.mark.parametrize("mixed", FORMS)
def test_fisher_parl_gradient_equals_the_dense_formula_away_from_the_optimum(mixed):
    """Away from the optimum (the tabular case's actor is offset from Q / alpha) the Fisher solve is not the Hessian
    one: the loss's gradient equals the dense formula with K = alpha mean_s (diag pi_s - pi_s pi_s^T) on the replay
    states, and differs from the Hessian's. Breaks if --parl-curvature fisher still took Hessian products, or if
    its products were wrong (the -pi pi^T term, alpha, the state mean)."""
    q_table, actor, reward, replay_states, pairs = tabular_case()
    expected, implicit = dense_expected_gradient(
        q_table, actor, reward, replay_states, pairs, mixed=mixed, curvature="fisher"
    )
    hessian, _ = dense_expected_gradient(q_table, actor, reward, replay_states, pairs, mixed=mixed)
    ours, metrics = reward_gradient(
        make_parl_loss(q_table, actor, replay_states, mixed=mixed, curvature="fisher"), pairs, reward
    )
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10)
    assert relative_error(expected, hessian) > 1e-3  # 5e-3 (paper), 1.1e-2 (one-step)
    assert float(implicit.norm()) > 0.05 * float(expected.norm())
    assert float(metrics["cg_negative_curvature"]) == 0


def test_fisher_curvature_has_no_negative_curvature_stop_where_the_hessian_has_one():
    """Far from the optimum and without damping, -d2J/dtheta2 is indefinite and CG stops at negative curvature in a
    product or two (returning a rescaled g, or 0); the Fisher form is positive semi-definite and CG runs on. Breaks
    if the Fisher matrix-vector product were the Hessian's or had the opposite sign."""
    q_table, _, reward, replay_states, pairs = tabular_case()
    actor = Table(q_table / ALPHA + 3.0 * torch.randn(S, 3, generator=torch.Generator().manual_seed(4), dtype=DTYPE))
    options = dict(cg_damping=0.0, cg_iters=30)
    _, hessian = reward_gradient(make_parl_loss(q_table, actor, replay_states, **options), pairs, reward)
    _, fisher = reward_gradient(
        make_parl_loss(q_table, actor, replay_states, curvature="fisher", **options), pairs, reward
    )
    assert float(hessian["cg_negative_curvature"]) == 1 and float(hessian["cg_iterations"]) <= 3
    assert float(fisher["cg_negative_curvature"]) == 0 and float(fisher["cg_iterations"]) > 3
    assert float(fisher["cg_residual"]) < 1e-8


def test_fisher_products_on_a_network_equal_the_dense_gauss_newton_matrix():
    """On a small MLP actor (several parameter tensors, a nonlinearity) the Fisher matrix-vector products of
    `fisher_implicit_vector`, `chunk` states at a time, equal alpha / N sum_s J_s^T (diag pi_s - pi_s pi_s^T) J_s
    built from dense Jacobians, and the solve returns (C + lambda I)^-1 g. Breaks if a chunk were skipped or counted
    twice, or if the parameters' order were mixed up between the two products."""
    torch.manual_seed(0)
    actor = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    states = torch.randn(7, 4, dtype=DTYPE)
    named = list(actor.named_parameters())
    params = [p for _, p in named]
    n = sum(p.numel() for p in params)

    def logits(flat: torch.Tensor) -> torch.Tensor:
        values = parl.unflatten(flat, params)
        return torch.func.functional_call(actor, {name: v for (name, _), v in zip(named, values)}, (states,))

    flat = parl.flatten([p.detach() for p in params])
    jac = torch.autograd.functional.jacobian(logits, flat)  # (N, A, n)
    pi = torch.softmax(logits(flat), -1)
    curvature = torch.zeros(n, n, dtype=DTYPE)
    for s in range(len(states)):
        middle = torch.diag(pi[s]) - torch.outer(pi[s], pi[s])
        curvature += ALPHA * jac[s].T @ middle @ jac[s] / len(states)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    result = parl.fisher_implicit_vector(actor, named, states, ALPHA, g, iterations=200, damping=0.05, chunk=3)
    expected = torch.linalg.solve(curvature + 0.05 * torch.eye(n, dtype=DTYPE), g)
    torch.testing.assert_close(result.x, expected, rtol=1e-7, atol=1e-9)
    assert not result.negative_curvature


# ---------------------------------------------------------------------------------------------------------------
# --cg-damping-relative


@pytest.mark.parametrize("curvature", ["hessian", "fisher"])
def test_relative_damping_is_c_times_alpha(curvature):
    """--cg-damping-relative C solves with lambda = C alpha (alpha = 0.3 here) and ignores --cg-damping. Breaks if
    lambda were C itself, or stayed the absolute --cg-damping."""
    q_table, actor, reward, replay_states, pairs = tabular_case()
    relative = 0.5
    expected, _ = dense_expected_gradient(
        q_table, actor, reward, replay_states, pairs, curvature=curvature, damping=relative * ALPHA
    )
    unscaled, _ = dense_expected_gradient(
        q_table, actor, reward, replay_states, pairs, curvature=curvature, damping=relative
    )
    ours, _ = reward_gradient(
        make_parl_loss(
            q_table, actor, replay_states, curvature=curvature, cg_damping=7.0, cg_damping_relative=relative
        ),
        pairs,
        reward,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10)
    assert relative_error(unscaled, expected) > 1e-2
    loss_fn = make_parl_loss(q_table, actor, replay_states)
    assert loss_fn.damping(ALPHA) == DAMPING  # the default: the absolute --cg-damping


# ---------------------------------------------------------------------------------------------------------------
# --curvature-states pairs


@pytest.mark.parametrize("curvature", ["hessian", "fisher"])
@pytest.mark.parametrize("mixed", FORMS)
def test_pairs_curvature_states_are_the_minibatch_fragments(curvature, mixed):
    """--curvature-states pairs takes the curvature (and the one-step mixed term) on the minibatch's 2BH fragment
    states and draws no replay states. Breaks if it still used the replay states (the sampler here raises) or a
    subset of the fragments' states (the dense formula weighs every fragment step)."""
    q_table, actor, reward, replay_states, pairs = tabular_case()
    expected, _ = dense_expected_gradient(
        q_table, actor, reward, pair_states(pairs), pairs, mixed=mixed, curvature=curvature
    )
    on_replay, _ = dense_expected_gradient(
        q_table, actor, reward, replay_states, pairs, mixed=mixed, curvature=curvature
    )
    loss_fn = make_parl_loss(q_table, actor, replay_states, mixed=mixed, curvature=curvature, curvature_states="pairs")
    loss_fn.sample_states = never_sampled
    ours, _ = reward_gradient(loss_fn, pairs, reward)
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10)
    assert relative_error(on_replay, expected) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# --parl-reward-clamp


@pytest.mark.parametrize("mixed", FORMS)
def test_reward_clamp_differentiates_the_reward_sac_sees(mixed):
    """--parl-reward-clamp differentiates the mixed term through clamp(r, -1, 1): the implicit part has no gradient
    on reward entries beyond +-1 (SAC sees them saturated), and equals the dense formula of the clamped reward.
    Breaks if the mixed term used the unclamped reward (the default's)."""
    q_table, actor, reward, replay_states, pairs = tabular_case()
    reward = Table(2.0 * reward.table.detach())  # about half the entries beyond +-1
    saturated = reward.table.detach().abs().flatten() > 1.0
    assert 0 < int(saturated.sum()) < saturated.numel()
    for curvature_states in ("replay", "pairs"):
        states = replay_states if curvature_states == "replay" else pair_states(pairs)
        expected, implicit = dense_expected_gradient(q_table, actor, reward, states, pairs, mixed=mixed, clamp=True)
        _, unclamped = dense_expected_gradient(q_table, actor, reward, states, pairs, mixed=mixed)
        options = dict(mixed=mixed, reward_clamp=True, curvature_states=curvature_states)
        ours, _ = reward_gradient(make_parl_loss(q_table, actor, replay_states, **options), pairs, reward)
        torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10)
        assert implicit[saturated].abs().max() == 0 and implicit[~saturated].abs().max() > 1e-4
        assert unclamped[saturated].abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# --parl-max-ratio


def test_max_ratio_caps_the_implicit_part_at_kappa_times_the_cross_entropy():
    """--parl-max-ratio kappa scales the implicit part's gradient, per minibatch, to norm kappa ||grad mean l|| when
    it is larger, keeping its direction, and leaves it alone when it is smaller; the cross-entropy's part is never
    scaled. Breaks if the cap were not applied, applied to the whole gradient, or measured against the wrong norm."""
    q_table, actor, reward, replay_states, pairs = tabular_case()
    free, free_metrics = reward_gradient(make_parl_loss(q_table, actor, replay_states), pairs, reward)
    (explicit,) = torch.autograd.grad(loss_inputs(pairs, reward).bce.mean(), reward.table)
    explicit = explicit.flatten()
    implicit = free - explicit
    ratio = float(implicit.norm() / explicit.norm())
    assert "second_order_scale" not in free_metrics  # off by default: no new tag
    kappa = 0.25 * ratio
    capped, metrics = reward_gradient(make_parl_loss(q_table, actor, replay_states, max_ratio=kappa), pairs, reward)
    torch.testing.assert_close(capped - explicit, 0.25 * implicit, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(float(metrics["second_order_scale"]), 0.25, rtol=1e-9, atol=0)
    torch.testing.assert_close(float(metrics["second_order_norm"]), float(implicit.norm()), rtol=1e-9, atol=0)
    loose, loose_metrics = reward_gradient(
        make_parl_loss(q_table, actor, replay_states, max_ratio=2 * ratio), pairs, reward
    )
    torch.testing.assert_close(loose, free, rtol=1e-12, atol=0)
    assert float(loose_metrics["second_order_scale"]) == 1.0
    # the value scales with the gradient: reward/hyper_term is the capped mixed term
    x = loss_inputs(pairs, reward)
    bce = x.bce.mean().detach()
    capped_value = make_parl_loss(q_table, actor, replay_states, max_ratio=kappa)(x)[0].detach() - bce
    free_value = make_parl_loss(q_table, actor, replay_states)(x)[0].detach() - bce
    torch.testing.assert_close(float(capped_value), 0.25 * float(free_value), rtol=1e-9, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# --implicit-correction reaches the paper mixed term's scores


@pytest.mark.parametrize("correction", ["ratio", "baseline", "ratio-baseline"])
def test_the_correction_reaches_the_mixed_scores_not_only_g(correction):
    """The paper mixed term alone along a fixed direction v: with --implicit-correction its scores carry the clipped
    per-step ratios pi/mu and/or the per-step leave-one-out baseline, equal to the dense eq. (17) Jacobian with the
    same correction, and unlike the uncorrected one. (The one-step form takes an exact expectation over actions on
    its states and has no sampled action to correct.) Breaks if the correction reached g only, i.e. if mixed_term
    ignored the ratios or the baseline."""
    q_table, actor, reward, replay_states, pairs = tabular_case()
    v = torch.randn(S, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    loss_fn = make_parl_loss(q_table, actor, replay_states, correction=correction, ratio_clip=2.0)
    x = loss_inputs(pairs, reward)
    (ours,) = torch.autograd.grad(loss_fn.mixed_term(x, replay_states, {"table": v}), reward.table)
    corrected = paper_mixed_jacobian(actor, reward, pairs, correction, 2.0).T @ v.flatten()
    plain = paper_mixed_jacobian(actor, reward, pairs, "none", 2.0).T @ v.flatten()
    torch.testing.assert_close(ours.flatten(), corrected, rtol=1e-9, atol=1e-12)
    assert relative_error(plain, corrected) > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# The command line

CORRECTED = [
    "--parl-curvature",
    "fisher",
    "--cg-damping-relative",
    "0.001",
    "--cg-iters",
    "30",
    "--curvature-states",
    "pairs",
    "--parl-reward-clamp",
    "--parl-max-ratio",
    "1",
    "--implicit-correction",
    "ratio-baseline",
]


def fake_trainer():
    from types import SimpleNamespace

    agent = SimpleNamespace(actor=nn.Linear(2, 3), qf1=None, qf2=None)
    return SimpleNamespace(agent=agent, buffer=None, device=torch.device("cpu"))


def test_the_flags_reach_the_loss_and_default_to_todays_computation():
    """Each new flag reaches PARLLoss through make_loss, and their defaults are today's computation (Hessian,
    absolute damping, replay states, no clamp, no cap). Breaks if make_loss dropped or swapped one."""
    default = parl.make_loss(parse_args(parl.Args, []), fake_trainer())
    assert (default.curvature, default.cg_damping_relative, default.curvature_states) == ("hessian", 0.0, "replay")
    assert (default.reward_clamp, default.max_ratio, default.damping(0.3)) == (False, 0.0, 0.1)
    loss_fn = parl.make_loss(parse_args(parl.Args, CORRECTED), fake_trainer())
    assert (loss_fn.curvature, loss_fn.cg_damping_relative, loss_fn.curvature_states) == ("fisher", 0.001, "pairs")
    assert (loss_fn.reward_clamp, loss_fn.max_ratio, loss_fn.cg_iters) == (True, 1.0, 30)
    assert loss_fn.correction == (True, True) and loss_fn.damping(0.3) == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--parl-curvature", "gauss"], ["--parl-curvature", "gauss"]),
        (["--cg-damping-relative", "-1"], ["--cg-damping-relative", "non-negative"]),
        (["--curvature-states", "fresh"], ["--curvature-states", "fresh"]),
        (["--parl-max-ratio", "-0.5"], ["--parl-max-ratio", "non-negative"]),
    ],
)
def test_bad_new_flags_are_one_line_errors(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(beamrider.main, ["--algo", "parl", *flags, "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert all(word in lines[0] for word in words), lines[0]


def test_the_corrected_flags_run_on_minatar_without_negative_curvature(tmp_path, monkeypatch):
    """The corrected A-PARL end to end on MinAtar: every reward minibatch's CG solve on the Fisher curvature runs
    without a negative-curvature stop, and the cap holds the implicit part at most 1 x the cross-entropy's. Breaks
    if a flag failed on the pipeline's CNN actor or its uint8 observations."""
    pytest.importorskip("minatar")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = tiny_preference_flags(**SHORT_PHASES, hvp_batch="32")
    result = run_script(
        "sobirl/beamrider.py",
        "--algo",
        "parl",
        *flags,
        *CORRECTED,
        "--total-timesteps",
        "150",
        "--parl-start",
        "100",
        "--runs-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(only_run_dir(tmp_path))
    assert [step for step, _ in tags["reward/cg_negative_curvature"]] == [141]
    assert all(value == 0.0 for _, value in tags["reward/cg_negative_curvature"])
    assert all(0.0 < value <= 1.0 for _, value in tags["reward/second_order_scale"])
    assert all(value > 0 for _, value in tags["reward/second_order_norm"])


def test_onehot_helper_matches_the_tabular_case():
    """The tabular case's pair states are one-hot rows over S states (the dense formulas index states by argmax)."""
    _, _, _, _, pairs = tabular_case()
    states = pair_states(pairs)
    assert states.shape[-1] == S and torch.equal(states.sum(-1), torch.ones(len(states), dtype=states.dtype))
    assert torch.equal(F.one_hot(states.argmax(-1), S).to(states.dtype), states)
