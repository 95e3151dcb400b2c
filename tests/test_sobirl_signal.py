"""The flags that give SoBiRL's implicit term a fair test: pooling over the reward epoch with its scale and cap, the
split-half cosine, the placebo, and the term on the latest phase's pairs. Each test names the broken variant it
catches."""

from __future__ import annotations

import copy

import pytest
import torch

from agents.feedback.pairs import PairBatch, PairBuffer
from agents.pipeline.losses import POOLED, LossInputs, bradley_terry_bce, fragment_returns
from agents.pipeline.reward_training import GradientPool, reward_epoch
from agents.sobirl import Args, SoBiRLLoss, implicit_term, selected_pairs
from tests.conftest import assert_usage_error, run_script

pytestmark = pytest.mark.usefixtures("single_thread")

COUNT, LENGTH, ACTIONS = 12, 3, 4


class Linear(torch.nn.Module):
    """A reward model on 2 x 10 x 10 uint8 observations."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.Linear(2 * 10 * 10, ACTIONS)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.layer(obs.float().flatten(1) / 255)


def labelled_buffer(seed: int = 0) -> PairBuffer:
    g = torch.Generator().manual_seed(seed)
    frames = lambda: torch.randint(0, 256, (COUNT, LENGTH, 2, 10, 10), generator=g, dtype=torch.uint8)
    actions = lambda: torch.randint(0, ACTIONS, (COUNT, LENGTH), generator=g)
    returns = lambda: torch.randn(COUNT, generator=g)
    pairs = PairBatch(
        frames(),
        actions(),
        frames(),
        actions(),
        (torch.rand(COUNT, generator=g) > 0.5).float(),
        returns(),
        returns(),
        torch.full((COUNT, LENGTH), 0.25),
        torch.full((COUNT, LENGTH), 0.25),
        torch.arange(COUNT) * 100,
    )
    buffer = PairBuffer(COUNT, LENGTH, (2, 10, 10), 1, "cpu")
    buffer.add(pairs)
    return buffer


def policy(obs: torch.Tensor) -> torch.Tensor:
    return torch.softmax(obs.float().flatten(1)[:, :ACTIONS] / 100, -1)


def epoch(loss, optimizer_cls=torch.optim.SGD, lr: float = 0.1, seed: int = 0):
    net = Linear(seed)
    optimizer = optimizer_cls(net.parameters(), lr=lr)
    stats = reward_epoch(net, optimizer, labelled_buffer(), 4, loss, alpha=0.5, global_step=10, policy_probs=policy,
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    return net, stats


def parameters(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_pooling_at_scale_zero_is_drlhfs_epoch_exactly():
    """Breaks if the pooled term still stepped per minibatch (or joined the loss) when a pool is present."""
    from agents.pipeline.losses import BradleyTerryLoss

    drlhf, _ = epoch(BradleyTerryLoss(), torch.optim.Adam)
    pooled, stats = epoch(SoBiRLLoss(hyper_start=0, pooling=(0.0, 0.0)), torch.optim.Adam)
    assert torch.equal(parameters(drlhf), parameters(pooled))
    assert "split_half_cosine" in stats and stats["pooled_ratio"] == 0.0


def test_the_pooled_step_is_the_epoch_mean_of_the_implicit_gradients_applied_once():
    """With SGD, the epoch's parameter change is -lr * (the cross-entropy steps + scale * the weighted mean of the
    minibatches' implicit gradients, each taken where its minibatch was). Breaks if the pool summed instead of
    averaging, applied the term more than once, or forgot the last partial minibatch's weight."""
    scale, lr = 0.3, 0.1
    start = parameters(Linear())
    plain_net, _ = epoch(SoBiRLLoss(hyper_start=0, pooling=(0.0, 0.0)), lr=lr)
    pooled_net, _ = epoch(SoBiRLLoss(hyper_start=0, pooling=(scale, 0.0)), lr=lr)
    # Both runs take the same cross-entropy steps until the last; their last steps differ by lr * scale * mean.
    # The implicit gradients were taken on the same parameters in both runs (the pool does not step), so recompute
    # them along the plain run's path.
    net = Linear()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss = SoBiRLLoss(hyper_start=0)
    buffer = labelled_buffer()
    from agents.pipeline.ensemble import epoch_order
    from agents.pipeline.reward_training import flat_gradient, reward_update

    parts = epoch_order(COUNT, False, torch.Generator().manual_seed(1)).split(4)
    total, weights = 0.0, 0.0
    for part in parts:
        pairs = buffer.get(buffer.oldest_first()[part])
        surrogate = SoBiRLLoss(hyper_start=0, pooling=(1.0, 0.0))
        net.train()
        from agents.feedback.pairs import pair_observations, split_pairs

        obs = pair_observations(pairs.frames1, pairs.frames2, LENGTH)
        r1, r2 = split_pairs(net(obs), len(part), LENGTH)
        pi1, pi2 = split_pairs(policy(obs), len(part), LENGTH)
        bce = bradley_terry_bce(
            fragment_returns(r1, pairs.actions1), fragment_returns(r2, pairs.actions2), pairs.labels
        )
        _, metrics = surrogate(LossInputs(pairs, r1, r2, bce, 0.5, 10, pi1, pi2, net))
        weight = len(part) / 4
        total = total + flat_gradient(metrics[POOLED], list(net.parameters())) * weight
        weights += weight
        reward_update(net, optimizer, pairs, loss.__class__(hyper_start=10**9), 0.5, 10, policy, weight)
    assert torch.allclose(parameters(net), parameters(plain_net), atol=1e-6)
    expected = parameters(plain_net) - lr * scale * total / weights
    assert torch.allclose(parameters(pooled_net), expected, atol=1e-6)
    assert not torch.allclose(parameters(pooled_net), start)


def test_the_cap_limits_the_pooled_norm_to_kappa_times_the_steps_own():
    """Breaks if the cap compared with the wrong norm or did not shrink (or shrank below the limit)."""
    param = torch.nn.Parameter(torch.zeros(3))
    pool = GradientPool([param], scale=1.0, cap=0.5)
    for value in ([3.0, 0.0, 0.0], [5.0, 0.0, 0.0]):
        pool.add((param * torch.tensor(value)).sum(), weight=1.0)
    param.grad = torch.tensor([0.0, 2.0, 0.0])  # the step's own gradient, norm 2
    metrics = pool.apply()
    assert metrics["pooled_ratio"] == pytest.approx(4.0 / 2.0) and metrics["pooled_capped"] == 1.0
    assert torch.allclose(param.grad, torch.tensor([1.0, 2.0, 0.0]))  # the mean (4, 0, 0) shrunk to norm 0.5 * 2
    loose = GradientPool([param], scale=1.0, cap=10.0)
    loose.add((param * torch.tensor([1.0, 0.0, 0.0])).sum(), weight=1.0)
    param.grad = torch.tensor([0.0, 2.0, 0.0])
    assert loose.apply()["pooled_capped"] == 0.0 and torch.allclose(param.grad, torch.tensor([1.0, 2.0, 0.0]))


def test_the_split_half_cosine_compares_the_even_and_odd_minibatches():
    """Breaks if the halves were mixed (the cosine of a vector with itself is 1 whatever the data)."""
    param = torch.nn.Parameter(torch.zeros(2))
    pool = GradientPool([param], scale=1.0, cap=0.0)
    for value in ([1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]):
        pool.add((param * torch.tensor(value)).sum(), weight=1.0)
    param.grad = torch.zeros(2)
    assert pool.apply()["split_half_cosine"] == pytest.approx(0.0, abs=1e-7)
    same = GradientPool([param], scale=1.0, cap=0.0)
    for value in ([1.0, 2.0], [2.0, 4.0]):
        same.add((param * torch.tensor(value)).sum(), weight=1.0)
    param.grad = torch.zeros(2)
    assert same.apply()["split_half_cosine"] == pytest.approx(1.0)


def test_the_placebo_weights_each_pair_by_another_pairs_cross_entropy():
    """The same values of l, shuffled among the pairs. Breaks if the placebo permuted the labels (the values of l
    change) or did not permute at all."""
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    a1, a2 = torch.randint(0, 4, (5, 3), generator=g), torch.randint(0, 4, (5, 3), generator=g)
    pi1, pi2 = (
        torch.softmax(torch.randn(5, 3, 4, generator=g), -1),
        torch.softmax(torch.randn(5, 3, 4, generator=g), -1),
    )
    bce = bradley_terry_bce(fragment_returns(r1, a1), fragment_returns(r2, a2), torch.ones(5))
    order = torch.tensor([3, 0, 4, 1, 2])
    placebo = implicit_term(bce, r1, a1, pi1, r2, a2, pi2, 2.0, order=order)
    plain = implicit_term(bce, r1, a1, pi1, r2, a2, pi2, 2.0)
    assert torch.allclose(placebo / bce[order], plain / bce)

    pairs = PairBatch(torch.zeros(5, 3, 2, 10, 10, dtype=torch.uint8), a1, torch.zeros(5, 3, 2, 10, 10,
                      dtype=torch.uint8), a2, torch.ones(5), torch.zeros(5), torch.zeros(5))  # fmt: skip
    x = LossInputs(pairs, r1, r2, bce, 0.5, 10, pi1, pi2)
    drawn = torch.randperm(5, generator=torch.Generator().manual_seed(7))
    loss = SoBiRLLoss(hyper_start=0, placebo_generator=torch.Generator().manual_seed(7))
    got, _ = loss(x)
    want = bce.mean() + implicit_term(bce, r1, a1, pi1, r2, a2, pi2, 2.0, order=drawn).mean()
    assert torch.allclose(got, want) and not torch.equal(drawn, torch.arange(5))


def test_the_placebo_generator_is_checkpointed_and_absent_without_the_placebo():
    """Breaks if a resumed placebo run drew other permutations than an uninterrupted one."""
    loss = SoBiRLLoss(hyper_start=0, placebo_generator=torch.Generator().manual_seed(3))
    torch.randperm(5, generator=loss.placebo_generator)
    state = copy.deepcopy(loss.state_dict())
    after = torch.randperm(9, generator=loss.placebo_generator)
    resumed = SoBiRLLoss(hyper_start=0, placebo_generator=torch.Generator().manual_seed(99))
    resumed.load_state_dict(state)
    assert torch.equal(torch.randperm(9, generator=resumed.placebo_generator), after)
    assert SoBiRLLoss().state_dict() == {}


def test_latest_pairs_are_those_collected_within_the_window():
    """Breaks on an off-by-one at the window's edge or a window counted from the wrong end."""
    collected = torch.tensor([0, 4_999, 5_000, 9_000])
    chosen = selected_pairs(collected, "latest", learning_starts=100, global_step=10_000, window=5_000)
    assert chosen.tolist() == [False, False, True, True]
    assert selected_pairs(collected, "learned", 100, 10_000, 5_000).tolist() == [False, True, True, True]
    assert selected_pairs(collected, "all", 100, 10_000, 5_000) is None


def test_the_latest_pairs_alone_carry_the_implicit_gradient():
    """The term's gradient does not depend on the rewards of the pairs left out. Breaks if 'latest' selected the
    old pairs."""
    buffer = labelled_buffer()
    pairs = buffer.get(buffer.oldest_first())  # collected at 0, 100, ..., 1100
    net = Linear()
    from agents.feedback.pairs import pair_observations, split_pairs

    obs = pair_observations(pairs.frames1, pairs.frames2, LENGTH)
    r1, r2 = split_pairs(net(obs), COUNT, LENGTH)
    r1.retain_grad()
    pi1, pi2 = split_pairs(policy(obs), COUNT, LENGTH)
    bce = bradley_terry_bce(fragment_returns(r1, pairs.actions1), fragment_returns(r2, pairs.actions2), pairs.labels)
    loss = SoBiRLLoss(hyper_start=0, implicit_pairs="latest", latest_window=300, pooling=(1.0, 0.0))
    _, metrics = loss(LossInputs(pairs, r1, r2, bce, 0.5, 1_200, pi1, pi2, net))
    metrics[POOLED].backward()
    moved = r1.grad.abs().sum((1, 2)) > 0
    assert moved.tolist() == [False] * 9 + [True] * 3  # collected at 900, 1000, 1100 >= 1200 - 300
    assert float(metrics["implicit_pairs_share"]) == pytest.approx(3 / COUNT)


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--implicit-scale", "0.1"], ["--implicit-scale", "--implicit-pooling"]),
        (["--implicit-cap", "2"], ["--implicit-cap", "--implicit-pooling"]),
        (["--implicit-window", "500"], ["--implicit-window", "latest"]),
        (["--implicit-pooling", "--implicit-scale", "-1"], ["--implicit-scale"]),
    ],
)
def test_bad_signal_flags_are_one_line(flags, words):
    assert_usage_error(run_script("sobirl/beamrider.py", "--algo", "sobirl", *flags), *words)


def test_a_pooled_placebo_run_on_the_latest_pairs_logs_its_diagnostics_and_resumes(tmp_path):
    from tests.conftest import only_run_dir, scalar_tags, tiny_preference_flags

    flags = [
        "--algo", "sobirl", "--env-id", "MinAtar/Breakout-v1", *tiny_preference_flags(), "--hyper-start", "0",
        "--implicit-pooling", "--implicit-scale", "0.5", "--implicit-cap", "1", "--implicit-placebo",
        "--implicit-pairs", "latest", "--total-timesteps", "400", "--runs-dir", str(tmp_path),
    ]  # fmt: skip
    result = run_script("sobirl/beamrider.py", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(only_run_dir(tmp_path))
    for tag in ("split_half_cosine", "pooled_ratio", "pooled_capped", "implicit_term", "implicit_pairs_share"):
        assert f"reward/{tag}" in tags, tag
    assert Args.RESUMABLE.isdisjoint({"implicit_pooling", "implicit_scale", "implicit_cap", "implicit_placebo"})
