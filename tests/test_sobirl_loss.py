"""The SoBiRL upper-level loss: exactness of its gradient in a tabular MDP and its algebraic properties."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from agents.feedback.pairs import PairBatch
from agents.pipeline.losses import LossInputs
from agents.sobirl import SoBiRLLoss, sobirl_loss, sobirl_loss_terms

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------------------------
# Tabular exactness of estimator (78) at lower-level discount 0
#
# With lower-level discount 0 the soft-optimal policy is pi = softmax(r(s, .) / alpha) exactly, so the hyper-objective
# F(theta) = E_{tau1, tau2 ~ pi_theta} [ BCE(tau1, tau2, y; theta) ] can be computed by enumerating every trajectory
# pair, and its gradient must equal the expectation of grad sobirl_loss with inv_alpha = 1 / alpha.

S, A, H, PARAMS, ALPHA = 3, 2, 2, 4, 0.7


def tabular_problem(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)
    transitions = rand(S, A, S) + 0.1
    return {
        "features": torch.randn(S, A, PARAMS, generator=g, dtype=torch.float64),  # r_theta(s, a) = features @ theta
        "theta": torch.randn(PARAMS, generator=g, dtype=torch.float64),
        "initial": torch.softmax(torch.randn(S, generator=g, dtype=torch.float64), 0),
        "transitions": transitions / transitions.sum(-1, keepdim=True),
        "true_reward": torch.randn(S, A, generator=g, dtype=torch.float64),
    }


def all_trajectories() -> tuple[torch.Tensor, torch.Tensor]:
    """States and actions, (N, H) each, of every length-H trajectory."""
    steps = list(itertools.product(range(S), range(A)))
    trajectories = list(itertools.product(steps, repeat=H))
    states = torch.tensor([[s for s, _ in tr] for tr in trajectories])
    actions = torch.tensor([[a for _, a in tr] for tr in trajectories])
    return states, actions


def trajectory_log_probs(
    problem: dict, theta: torch.Tensor, states: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:
    rewards = problem["features"] @ theta  # (S, A)
    log_pi = torch.log_softmax(rewards / ALPHA, dim=-1)
    log_p = problem["initial"].log()[states[:, 0]] + log_pi[states, actions].sum(1)
    moves = problem["transitions"][states[:, :-1], actions[:, :-1], states[:, 1:]]
    return log_p + moves.log().sum(1)


def pair_labels(problem: dict, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Soft labels y[i, j] = P(tau_i preferred to tau_j) from a fixed ground truth (independent of theta)."""
    returns = problem["true_reward"][states, actions].sum(1)
    return torch.sigmoid(returns[:, None] - returns[None, :])


def hyper_objective(problem: dict, theta: torch.Tensor) -> torch.Tensor:
    states, actions = all_trajectories()
    p = trajectory_log_probs(problem, theta, states, actions).exp()
    returns = (problem["features"] @ theta)[states, actions].sum(1)
    y = pair_labels(problem, states, actions)
    bce = F.binary_cross_entropy_with_logits(returns[:, None] - returns[None, :], y, reduction="none")
    return (p[:, None] * p[None, :] * bce).sum()


def class_loss(r1, a1, pi1, r2, a2, pi2, y, inv_alpha):
    """SoBiRLLoss, the class that trains, on one batch, as the pipeline calls it (on-policy: mu = pi)."""
    if inv_alpha == 0:
        return sobirl_loss(r1, a1, pi1, r2, a2, pi2, y, inv_alpha)
    taken = lambda pi, a: pi.gather(-1, a[..., None]).squeeze(-1)
    batch, length = a1.shape
    blank = torch.zeros(batch, length, 1, dtype=torch.uint8)
    pairs = PairBatch(blank, a1, blank, a2, y, y, y, taken(pi1, a1), taken(pi2, a2))
    bce = F.binary_cross_entropy_with_logits(
        r1.gather(-1, a1[..., None]).squeeze(-1).sum(1) - r2.gather(-1, a2[..., None]).squeeze(-1).sum(1),
        y,
        reduction="none",
    )
    return SoBiRLLoss(hyper_start=0)(LossInputs(pairs, r1, r2, bce, 1.0 / inv_alpha, 1, pi1, pi2))[0]


def expected_loss_gradient(problem: dict, inv_alpha: float, loss_fn=sobirl_loss) -> torch.Tensor:
    """sum over all pairs of P(tau1) P(tau2) grad loss_fn(tau1, tau2), each pair a batch of one."""
    states, actions = all_trajectories()
    theta = problem["theta"].clone().requires_grad_(True)
    with torch.no_grad():
        p = trajectory_log_probs(problem, theta, states, actions).exp()
        y = pair_labels(problem, states, actions)
    rewards = (problem["features"] @ theta)[states]  # (N, H, A), carries the gradient
    probs = torch.softmax(rewards.detach() / ALPHA, dim=-1)
    n = len(states)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    i, j = i.flatten(), j.flatten()
    total = 0.0
    # One pair per call: sobirl_loss averages over its batch, and each pair needs its own probability weight.
    for chunk in torch.arange(len(i)).split(1):
        a, b = i[chunk], j[chunk]
        loss = loss_fn(rewards[a], actions[a], probs[a], rewards[b], actions[b], probs[b], y[a, b], inv_alpha)
        total = total + p[a] * p[b] * loss
    (grad,) = torch.autograd.grad(total.sum(), theta)
    return grad


def central_difference(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(x)
    for k in range(len(x)):
        step = torch.zeros_like(x)
        step[k] = eps
        grad[k] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("loss_fn", [sobirl_loss, class_loss], ids=["sobirl_loss", "SoBiRLLoss"])
def test_loss_gradient_equals_exact_hypergradient_in_tabular_mdp(loss_fn):
    """The pure function and the class the pipeline trains with. Breaks if SoBiRLLoss computed the implicit term
    other than estimator (78) (a wrong sign, a missing 1/alpha, the wrong fragments)."""
    problem = tabular_problem()
    exact = central_difference(lambda th: hyper_objective(problem, th), problem["theta"])
    estimate = expected_loss_gradient(problem, 1.0 / ALPHA, loss_fn)
    torch.testing.assert_close(estimate, exact, rtol=1e-6, atol=1e-9)
    # The implicit term is what makes it exact: the BCE gradient alone misses the policy's dependence on theta.
    bce_only = expected_loss_gradient(problem, inv_alpha=0.0)
    assert (bce_only - exact).abs().max() > 1e-3 * exact.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# Algebraic properties of the loss


def random_batch(seed: int = 0, batch: int = 5, length: int = 4, actions: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r1 = torch.randn(batch, length, actions, generator=g, dtype=dtype, requires_grad=True)
    r2 = torch.randn(batch, length, actions, generator=g, dtype=dtype, requires_grad=True)
    a1 = torch.randint(0, actions, (batch, length), generator=g)
    a2 = torch.randint(0, actions, (batch, length), generator=g)
    pi1 = torch.softmax(torch.randn(batch, length, actions, generator=g, dtype=dtype), -1)
    pi2 = torch.softmax(torch.randn(batch, length, actions, generator=g, dtype=dtype), -1)
    y = torch.rand(batch, generator=g, dtype=dtype)
    return r1, a1, pi1, r2, a2, pi2, y


def value_and_grads(r1, a1, pi1, r2, a2, pi2, y, inv_alpha):
    loss = sobirl_loss(r1, a1, pi1, r2, a2, pi2, y, inv_alpha)
    g1, g2 = torch.autograd.grad(loss, (r1, r2))
    return loss.detach(), g1, g2


def reference_bce(r1, a1, r2, a2, y):
    """The reference code's form: p = 1 / (1 + exp(clamp(R2 - R1))), then binary cross-entropy."""
    ret1 = r1.gather(-1, a1[..., None]).squeeze(-1).sum(1)
    ret2 = r2.gather(-1, a2[..., None]).squeeze(-1).sum(1)
    p = 1.0 / (1.0 + torch.clamp(ret2 - ret1, -50.0, 50.0).exp())
    return F.binary_cross_entropy(p, y)


def test_zero_inv_alpha_is_the_bce_and_needs_no_policy():
    r1, a1, _, r2, a2, _, y = random_batch()
    loss, g1, g2 = value_and_grads(r1, a1, None, r2, a2, None, y, 0.0)
    ref = reference_bce(r1, a1, r2, a2, y)
    ref_g1, ref_g2 = torch.autograd.grad(ref, (r1, r2))
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(g1, ref_g1)
    torch.testing.assert_close(g2, ref_g2)


def test_implicit_term_needs_the_policy():
    r1, a1, _, r2, a2, _, y = random_batch()
    with pytest.raises(ValueError, match="pi1 and pi2"):
        sobirl_loss(r1, a1, None, r2, a2, None, y, 1.0)


def test_swapping_fragments_and_labels_leaves_the_loss_unchanged():
    r1, a1, pi1, r2, a2, pi2, y = random_batch(seed=1)
    loss, g1, g2 = value_and_grads(r1, a1, pi1, r2, a2, pi2, y, 2.5)
    swapped, s2, s1 = value_and_grads(r2, a2, pi2, r1, a1, pi1, 1 - y, 2.5)
    torch.testing.assert_close(swapped, loss)
    torch.testing.assert_close(s1, g1)
    torch.testing.assert_close(s2, g2)


def test_implicit_term_vanishes_for_one_hot_policy_on_taken_actions():
    r1, a1, _, r2, a2, _, y = random_batch(seed=2)
    one_hot1 = F.one_hot(a1, r1.shape[-1]).to(r1.dtype)
    one_hot2 = F.one_hot(a2, r2.shape[-1]).to(r2.dtype)
    loss, g1, g2 = value_and_grads(r1, a1, one_hot1, r2, a2, one_hot2, y, 3.0)
    bce, b1, b2 = value_and_grads(r1, a1, None, r2, a2, None, y, 0.0)
    _, _, hyper = sobirl_loss_terms(r1, a1, one_hot1, r2, a2, one_hot2, y, 3.0)
    assert hyper.abs() < 1e-12
    torch.testing.assert_close((loss, g1, g2), (bce, b1, b2))


def test_implicit_term_vanishes_for_rewards_constant_across_actions():
    """A reward that ignores the action (r(s, a) = c(s)) gives r(s, a_t) - E_pi r(s, .) = 0 and a zero gradient."""
    _, a1, pi1, _, a2, pi2, y = random_batch(seed=3)
    g = torch.Generator().manual_seed(3)
    c1 = torch.randn(5, 4, 1, generator=g, dtype=torch.float64, requires_grad=True)
    c2 = torch.randn(5, 4, 1, generator=g, dtype=torch.float64, requires_grad=True)

    def value_and_state_grads(inv_alpha, p1, p2):
        loss = sobirl_loss(c1.expand(5, 4, 3), a1, p1, c2.expand(5, 4, 3), a2, p2, y, inv_alpha)
        return (loss.detach(), *torch.autograd.grad(loss, (c1, c2)))

    torch.testing.assert_close(value_and_state_grads(3.0, pi1, pi2), value_and_state_grads(0.0, None, None))


def test_loss_is_bce_plus_weighted_advantage_sum():
    r1, a1, pi1, r2, a2, pi2, y = random_batch(seed=4)
    inv_alpha = 1.7
    loss, bce, hyper = sobirl_loss_terms(r1, a1, pi1, r2, a2, pi2, y, inv_alpha)
    per_pair_bce = F.binary_cross_entropy(
        torch.sigmoid(
            r1.gather(-1, a1[..., None]).squeeze(-1).sum(1) - r2.gather(-1, a2[..., None]).squeeze(-1).sum(1)
        ),
        y,
        reduction="none",
    )
    h = sum(
        (r.gather(-1, a[..., None]).squeeze(-1) - (r * pi).sum(-1)).sum(1)
        for r, a, pi in ((r1, a1, pi1), (r2, a2, pi2))
    )
    expected = (per_pair_bce.detach() * inv_alpha * h).mean()
    torch.testing.assert_close(hyper, expected.detach())
    torch.testing.assert_close(bce, per_pair_bce.mean().detach())
    torch.testing.assert_close(loss.detach(), (per_pair_bce.mean() + expected).detach())


def test_return_difference_is_clamped():
    r1 = torch.zeros(1, 2, 2, dtype=torch.float64)
    r1[..., 0] = 60.0  # R1 - R2 = 120, clamped to 50
    r2 = torch.zeros(1, 2, 2, dtype=torch.float64)
    a = torch.zeros(1, 2, dtype=torch.long)
    loss = sobirl_loss(r1, a, None, r2, a, None, torch.zeros(1, dtype=torch.float64), 0.0)
    torch.testing.assert_close(loss, torch.tensor(50.0, dtype=torch.float64))


def test_baseline_subtracts_the_other_pairs_mean_cross_entropy_from_the_implicit_weight():
    r1, a1, pi1, r2, a2, pi2, y = random_batch(seed=5)
    inv_alpha = 0.9
    _, bce_mean, plain = sobirl_loss_terms(r1, a1, pi1, r2, a2, pi2, y, inv_alpha)
    _, _, centred = sobirl_loss_terms(r1, a1, pi1, r2, a2, pi2, y, inv_alpha, baseline=True)
    per_pair = F.binary_cross_entropy_with_logits(
        r1.gather(-1, a1[..., None]).squeeze(-1).sum(1) - r2.gather(-1, a2[..., None]).squeeze(-1).sum(1),
        y,
        reduction="none",
    )
    h = sum(
        (r.gather(-1, a[..., None]).squeeze(-1) - (r * pi).sum(-1)).sum(1)
        for r, a, pi in ((r1, a1, pi1), (r2, a2, pi2))
    )
    # Leave-one-out: pair i's baseline is the mean over the other pairs, so it does not depend on pair i.
    others = (per_pair.sum() - per_pair) / (len(per_pair) - 1)
    torch.testing.assert_close(centred, ((per_pair - others) * inv_alpha * h).mean().detach())
    assert not torch.allclose(centred, plain)
    # Equal cross-entropies leave nothing to centre: the implicit term vanishes.
    same = sobirl_loss_terms(r1, a1, pi1, r1, a1, pi1, torch.full_like(y, 0.5), inv_alpha, baseline=True)[2]
    torch.testing.assert_close(same, torch.zeros_like(same))


# ---------------------------------------------------------------------------------------------------------------
# SoBiRLLoss computes through sobirl_loss_terms, exactly as it did with its own copy of the math


def previous_class_formula(x: LossInputs, ratio_clip, baseline, ratios, learned_from, clamp_aware):
    """What SoBiRLLoss computed before it went through sobirl_loss_terms (its own copy of estimator (78)), written
    out here without the module's helpers: (loss, the ratios' mean and share at the clip, or None)."""
    p = x.pairs
    r1, r2 = (x.r1.clamp(-1.0, 1.0), x.r2.clamp(-1.0, 1.0)) if clamp_aware else (x.r1, x.r2)
    taken = lambda values, a: values.gather(-1, a.long().unsqueeze(-1)).squeeze(-1)
    raw = torch.cat([taken(x.pi1, p.actions1) / p.behaviour1, taken(x.pi2, p.actions2) / p.behaviour2])
    w1, w2 = raw.clamp(max=ratio_clip).chunk(2) if ratios else (1.0, 1.0)

    def weighted_advantages(r, a, pi, w):
        return ((taken(r, a) - (r * pi.detach()).sum(-1)) * w).sum(-1)

    weight = x.bce.detach()
    if baseline:
        weight = weight - (weight.sum() - weight) / (len(weight) - 1)
    hyper = weight / x.alpha * (weighted_advantages(r1, p.actions1, x.pi1, w1) +
                                weighted_advantages(r2, p.actions2, x.pi2, w2))  # fmt: skip
    if learned_from is not None:
        hyper = hyper * (p.collected >= learned_from).to(hyper.dtype)
    ratio_stats = (raw.clamp(max=ratio_clip).mean(), (raw >= ratio_clip).float().mean()) if ratios else None
    return x.bce.mean() + x.policy_share * hyper.mean(), ratio_stats


@pytest.mark.parametrize("correction", ["none", "baseline", "ratio", "ratio-baseline"])
@pytest.mark.parametrize("implicit_pairs", ["all", "learned"])
@pytest.mark.parametrize("clamp_aware", [False, True])
@pytest.mark.parametrize("share", [1.0, 1 / 3])
def test_the_class_computes_what_it_did_before_for_every_flag(correction, implicit_pairs, clamp_aware, share):
    """Every combination of --implicit-correction, --implicit-pairs, --clamp-aware and the ensemble's policy share:
    the same loss value and the same gradients in r1 and r2 as the class's own copy of the formula had."""
    r1, a1, pi1, r2, a2, pi2, y = random_batch(seed=6)
    r1, r2 = 2 * r1.detach().requires_grad_(True), 2 * r2.detach().requires_grad_(True)  # some beyond the clamp
    g = torch.Generator().manual_seed(6)
    mu1, mu2 = (0.05 + 0.9 * torch.rand(5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    collected = torch.tensor([0, 50, 99, 100, 400])
    blank = torch.zeros(5, 4, 1, dtype=torch.uint8)
    pairs = PairBatch(blank, a1, blank, a2, y, y, y, mu1, mu2, collected)
    bce = F.binary_cross_entropy_with_logits(
        r1.gather(-1, a1[..., None]).squeeze(-1).sum(1) - r2.gather(-1, a2[..., None]).squeeze(-1).sum(1),
        y,
        reduction="none",
    )
    x = LossInputs(pairs, r1, r2, bce, 0.4, 500, pi1, pi2, policy_share=share)
    loss_fn = SoBiRLLoss(0, correction, 2.0, clamp_aware, implicit_pairs, learning_starts=100)
    loss, metrics = loss_fn(x)
    ratios, baseline = correction in ("ratio", "ratio-baseline"), correction in ("baseline", "ratio-baseline")
    learned_from = 100 if implicit_pairs == "learned" else None
    expected, ratio_stats = previous_class_formula(x, 2.0, baseline, ratios, learned_from, clamp_aware)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, (r1, r2), retain_graph=True)
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (r1, r2)), rtol=1e-12, atol=1e-12)
    if ratios:  # reward/ratio_mean and reward/ratio_clipped: the share of raw ratios pi/mu at or past the clip of 2
        mean, clipped = ratio_stats
        assert 0 < float(clipped) < 1
        torch.testing.assert_close(metrics["ratio_mean"], mean.to(metrics["ratio_mean"].dtype))
        assert float(metrics["ratio_clipped"]) == pytest.approx(float(clipped))
