"""Preference-learning parts: teachers, query schedule, fragment stacking, pair buffer, reward CNN, reward epochs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from agents.feedback.pairs import (
    PairBatch,
    PairBuffer,
    fragment_observations,
    pairs_schedule,
    round_preserving_sum,
    stack_windows,
)
from agents.feedback.teachers import bernoulli_labels, label_pairs, oracle_labels
from agents.pipeline.reward_model import RewardCNN, conv_output_sizes, drop_units_, random_bits
from agents.pipeline.reward_training import preference_accuracy, reward_epoch, reward_function, reward_update
from agents.sobirl import SoBiRLLoss

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------------------------
# Teachers


def test_oracle_prefers_higher_return_and_splits_ties():
    labels = oracle_labels(torch.tensor([3.0, 0.0, 2.0, -1.0]), torch.tensor([1.0, 1.0, 2.0, -1.0]))
    assert labels.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_bernoulli_label_frequencies_follow_bradley_terry():
    n = 20_000
    differences = torch.tensor([0.0, 1.0, -2.0, 80.0])
    returns1 = differences.repeat_interleave(n)
    labels = bernoulli_labels(returns1, torch.zeros_like(returns1), torch.Generator().manual_seed(0))
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    frequencies = labels.view(len(differences), n).mean(1)
    expected = torch.sigmoid(differences.clamp(-50, 50))
    assert (frequencies - expected).abs().max() < 0.015


def test_label_pairs_dispatches_and_rejects_unknown_teachers():
    r1, r2 = torch.tensor([1.0]), torch.tensor([0.0])
    assert label_pairs("oracle", r1, r2).item() == 1.0
    with pytest.raises(ValueError, match="unknown teacher"):
        label_pairs("human", r1, r2)


# ---------------------------------------------------------------------------------------------------------------
# Query schedule (docs/algorithms.md, the practical pipeline)


def test_paper_schedule():
    schedule = pairs_schedule(600, 9000, 2000)
    assert len(schedule) == 2001
    assert schedule[0] == 600
    assert schedule[1:213] == [6] * 212
    assert schedule[213] == 5
    assert sum(schedule) == 9000
    assert sum(schedule[:432]) == 2967  # iterations 0..431, the last before global_step passes 4.3M
    assert all(a >= b for a, b in zip(schedule[1:], schedule[2:]))
    assert min(schedule[1:]) == 3


def test_rounding_keeps_the_sum_and_picks_largest_fractions():
    assert round_preserving_sum(np.array([0.2, 0.7, 1.1])).tolist() == [0, 1, 1]
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.uniform(0, 4, size=6)
        x *= round(x.sum()) / x.sum()
        rounded = round_preserving_sum(x)
        assert rounded.sum() == round(x.sum())
        # Brute force over floor/ceil choices: no integer vector with the same sum is closer in L1.
        best = min(
            np.abs(x - choice).sum()
            for choice in (np.floor(x) + np.array(bits) for bits in itertools.product([0, 1], repeat=6))
            if choice.sum() == round(x.sum())
        )
        assert np.isclose(np.abs(x - rounded).sum(), best)


def test_schedule_without_iterations_is_just_the_warmup():
    assert pairs_schedule(10, 20, 0) == [10]
    assert sum(pairs_schedule(4, 10, 3)) == 10


# ---------------------------------------------------------------------------------------------------------------
# Fragments


def test_stack_windows_matches_naive_loop():
    frames = torch.randint(0, 256, (2, 3, 7 + 3, 5, 6), dtype=torch.uint8)
    windows = stack_windows(frames, 4)
    assert windows.shape == (2, 3, 7, 4, 5, 6)
    for i, j, h in itertools.product(range(2), range(3), range(7)):
        assert torch.equal(windows[i, j, h], frames[i, j, h : h + 4])
    assert stack_windows(frames, 1) is frames
    flat = torch.randint(0, 256, (2, 9, 3), dtype=torch.uint8)  # 1-d frames
    assert torch.equal(stack_windows(flat, 2, frame_ndim=1)[1, 4], flat[1, 4:6])


def test_fragment_observations_flatten_in_step_order():
    frames = torch.randint(0, 256, (3, 5 + 3, 6, 7), dtype=torch.uint8)
    obs = fragment_observations(frames, 5)
    assert obs.shape == (15, 4, 6, 7)
    for n, h in itertools.product(range(3), range(5)):
        assert torch.equal(obs[n * 5 + h], frames[n, h : h + 4])
    unstacked = torch.randint(0, 256, (3, 5, 2, 6, 7), dtype=torch.uint8)  # stack 1: frames are observations
    assert torch.equal(fragment_observations(unstacked, 5), unstacked.reshape(15, 2, 6, 7))


# ---------------------------------------------------------------------------------------------------------------
# Pair buffer


def make_pairs(ids: list[int], length: int = 3, stack: int = 2, frame_shape=(4, 4)) -> PairBatch:
    """Pairs whose every field encodes the pair's id, so the buffer's contents can be traced."""
    ids_t = torch.tensor(ids, dtype=torch.float32)
    frames = ids_t.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, length + stack - 1, *frame_shape)
    actions = torch.tensor(ids).view(-1, 1).expand(-1, length)
    return PairBatch(frames, actions, frames + 100, actions + 100, ids_t / 100, ids_t, ids_t + 0.5)


def stored_ids(buffer: PairBuffer) -> list[int]:
    return buffer.get(buffer.oldest_first()).returns1.long().tolist()


def test_pair_buffer_is_fifo():
    buffer = PairBuffer(5, fragment_length=3, frame_shape=(4, 4), stack=2, device="cpu")
    buffer.add(make_pairs([0, 1, 2]))
    assert len(buffer) == 3 and stored_ids(buffer) == [0, 1, 2]
    buffer.add(make_pairs([3, 4, 5, 6]))
    assert len(buffer) == 5 and stored_ids(buffer) == [2, 3, 4, 5, 6]
    buffer.add(make_pairs(list(range(10, 18))))  # more than the capacity at once
    assert stored_ids(buffer) == [13, 14, 15, 16, 17]
    assert buffer.total_added == 15
    batch = buffer.get(buffer.oldest_first())
    assert torch.equal(batch.frames1[:, 0, 0, 0], torch.arange(13, 18, dtype=torch.uint8))
    assert torch.equal(batch.actions2[:, -1], torch.arange(113, 118))
    assert torch.allclose(batch.labels, torch.arange(13, 18) / 100)
    assert torch.allclose(batch.returns2, torch.arange(13, 18) + 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Reward CNN (SoBiRL Appendix I)


SMALL = 44  # the smallest square input the paper's kernels accept is 43 pixels; small keeps tests fast


def test_reward_cnn_architecture():
    assert conv_output_sizes(84) == [26, 11, 9, 7]
    net = RewardCNN((4, 84, 84), 9)
    assert net.features == 784
    assert sum(p.numel() for p in net.parameters()) == 65161
    assert [c.kernel_size[0] for c in net.convs] == [7, 5, 3, 3]
    assert [c.stride[0] for c in net.convs] == [3, 2, 1, 1]
    out = net.eval()(torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8))
    assert out.shape == (6, 9)


def test_reward_cnn_on_small_boards_uses_two_3x3_convolutions():
    net = RewardCNN((4, 10, 10), 6)  # MinAtar-sized
    assert [c.kernel_size[0] for c in net.convs] == [3, 3] and net.features == 16 * 6 * 6
    assert net.eval()(torch.randint(0, 256, (5, 4, 10, 10), dtype=torch.uint8)).shape == (5, 6)
    with pytest.raises(ValueError, match="too small"):
        RewardCNN((4, 4, 4), 6)


def test_reward_cnn_eval_is_deterministic_and_matches_stock_modules():
    torch.manual_seed(0)
    net = RewardCNN((4, 84, 84), 5).double()
    obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    net.train()
    net(obs)  # move the running statistics away from their initial values
    net.eval()
    torch.testing.assert_close(net(obs), net.reference_forward(obs))
    torch.testing.assert_close(net(obs), net(obs))


def test_reward_cnn_training_without_dropout_matches_stock_modules():
    torch.manual_seed(1)
    net = RewardCNN((4, 84, 84), 5, dropout=0.0).double().train()
    obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)

    def grads(forward):
        net.zero_grad()
        out = forward(obs)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    out, g = grads(net)
    ref_out, ref_g = grads(net.reference_forward)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(g, ref_g):
        # Conv biases before training-mode BatchNorm have an exactly zero gradient; compare on the overall scale.
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert int(net.norms[0].num_batches_tracked) == 2


def test_reward_cnn_dropout_gradient_matches_finite_differences():
    """Reseeding before each forward pass fixes the dropout masks, making the training-mode net a deterministic
    function of its parameters whose autograd gradient finite differences can check."""
    torch.manual_seed(2)
    net = RewardCNN((4, SMALL, SMALL), 3).double().train()
    obs = torch.randint(0, 256, (6, 4, SMALL, SMALL), dtype=torch.uint8)
    weights = torch.randn(6, 3, dtype=torch.float64)

    def objective() -> torch.Tensor:
        torch.manual_seed(123)
        return (net(obs) * weights).sum()

    net.zero_grad()
    objective().backward()
    eps = 1e-6
    for param in (net.convs[0].weight, net.convs[1].weight, net.norms[0].weight, net.norms[2].bias, net.fc.weight):
        for index in [(0,) * param.dim(), tuple(s - 1 for s in param.shape)]:
            with torch.no_grad():
                param[index] += eps
                up = objective()
                param[index] -= 2 * eps
                down = objective()
                param[index] += eps
            numeric = (up - down) / (2 * eps)
            assert abs(param.grad[index] - numeric) < 1e-6 * max(1.0, abs(numeric))


def test_dropout_drops_half_the_units_and_rescales_the_rest():
    like = torch.empty(64, 16, 26, 26).contiguous(memory_format=torch.channels_last)
    bits = random_bits(like)
    assert bits.shape == like.shape and bits.stride() == like.stride()
    assert set(bits.unique().tolist()) == {0, -1}
    assert abs((bits == -1).float().mean().item() - 0.5) < 0.005
    z = torch.randn(4096, dtype=torch.float64)
    dropped = drop_units_(z.clone(), 0.5)
    assert set(dropped[dropped != z].tolist()) == {0.0}
    assert abs((dropped == 0).double().mean().item() - 0.5) < 0.05
    torch.manual_seed(3)
    net = RewardCNN((4, 84, 84), 4).train()
    obs = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8)
    assert not torch.equal(net(obs), net(obs))  # fresh masks every pass


# ---------------------------------------------------------------------------------------------------------------
# Reward epochs and accuracy


def bright_pairs(n: int, length: int, generator: torch.Generator, size: int = 84) -> PairBatch:
    """Fragments whose frames are bright (ground-truth reward 1) or dark (0) at random."""

    def fragments():
        bright = torch.rand(n, length + 3, generator=generator) < 0.5
        frames = torch.where(bright, 200, 20).to(torch.uint8).view(n, length + 3, 1, 1).expand(-1, -1, size, size)
        noise = torch.randint(0, 30, frames.shape, generator=generator, dtype=torch.uint8)
        actions = torch.randint(0, 3, (n, length), generator=generator)
        return frames + noise, actions, bright[:, 3:].float().sum(1)

    f1, a1, g1 = fragments()
    f2, a2, g2 = fragments()
    return PairBatch(f1, a1, f2, a2, oracle_labels(g1, g2), g1, g2)


def synthetic_buffer(generator: torch.Generator, pairs: int = 24, length: int = 4) -> PairBuffer:
    buffer = PairBuffer(pairs, fragment_length=length, frame_shape=(SMALL, SMALL), stack=4, device="cpu")
    buffer.add(bright_pairs(pairs, length, generator, size=SMALL))
    return buffer


def test_reward_epochs_reduce_the_bce():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    buffer = synthetic_buffer(g)
    net = RewardCNN((4, SMALL, SMALL), 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = reward_epoch(net, optimizer, buffer, batch_size=10, generator=g)
    for _ in range(14):
        last = reward_epoch(net, optimizer, buffer, batch_size=10, generator=g)
    assert not net.training
    assert first["steps"] == 3  # 10 + 10 + a partial batch of 4
    assert first["hyper_term"] == 0.0 and last["loss"] == last["bce"]
    assert last["bce"] < 0.6 * first["bce"]
    assert last["accuracy"] > 0.8
    accuracy = preference_accuracy(
        net, buffer.frames1, buffer.actions1, buffer.frames2, buffer.actions2, buffer.returns1, buffer.returns2, 7
    )
    assert accuracy > 0.8


def test_reward_epoch_with_implicit_term_evaluates_the_policy_once_per_observation():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    buffer = synthetic_buffer(g)
    net = RewardCNN((4, SMALL, SMALL), 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-4)
    calls = []

    def uniform_policy(obs: torch.Tensor) -> torch.Tensor:
        calls.append(len(obs))
        assert not torch.is_grad_enabled()
        return torch.full((len(obs), 3), 1 / 3)

    sobirl = SoBiRLLoss(hyper_start=0)
    stats = reward_epoch(
        net, optimizer, buffer, 10, sobirl, alpha=2.0, global_step=1, policy_probs=uniform_policy, policy_chunk=32
    )
    assert sum(calls) == 24 * 2 * 4 and max(calls) <= 32
    assert stats["hyper_term"] != 0.0
    assert math.isclose(stats["loss"], stats["bce"] + stats["hyper_term"], rel_tol=1e-5, abs_tol=1e-7)
    with pytest.raises(ValueError, match="policy_probs"):
        reward_epoch(net, optimizer, buffer, 10, sobirl, alpha=2.0, global_step=1)


class RecordingLoss:
    """A loss that asks for the policy and keeps what it was given."""

    policy_probs = None

    def __init__(self):
        self.seen = []

    def needs_policy(self, global_step: int) -> bool:
        return True

    def __call__(self, x):
        self.seen.append(x)
        return x.bce.mean(), {}


def test_the_policy_a_loss_sees_is_the_policy_at_each_steps_own_state():
    """A state-dependent policy: pi1[i, t] must be pi at fragment 1's observation t of pair i (and pi2 at fragment
    2's). Breaks if pi were read at fragment 2's states, at shifted steps, or at another pair's."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    buffer = synthetic_buffer(g, pairs=6, length=4)
    net = RewardCNN((4, SMALL, SMALL), 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-4)

    def state_policy(obs: torch.Tensor) -> torch.Tensor:
        # Depends on every frame of the stack, so a stack built from the wrong frames gives another policy.
        weights = torch.arange(1.0, 5.0).view(1, 4)
        logits = (obs.float().mean((2, 3)) * weights).sum(1, keepdim=True) / 100.0
        return torch.softmax(logits * torch.tensor([[1.0, -1.0, 0.5]]), -1)

    loss = RecordingLoss()
    reward_update(net, optimizer, buffer.get(buffer.oldest_first()), loss, policy_probs=state_policy, policy_chunk=5)
    [x] = loss.seen
    p = x.pairs
    expected1 = state_policy(fragment_observations(p.frames1, 4)).view(6, 4, 3)
    expected2 = state_policy(fragment_observations(p.frames2, 4)).view(6, 4, 3)
    torch.testing.assert_close(x.pi1, expected1)
    torch.testing.assert_close(x.pi2, expected2)
    assert not torch.allclose(expected1, expected2) and not torch.allclose(expected1[:, 0], expected1[:, 1])


class MeanPixelReward(nn.Module):
    """r(s, a) = mean pixel value of the newest frame of s, for every action."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs[:, -1].float().mean((1, 2))[:, None].expand(-1, 3)


def test_preference_accuracy_skips_ties_and_restores_mode():
    g = torch.Generator().manual_seed(1)
    pairs = bright_pairs(12, 3, g, size=8)
    net = MeanPixelReward().train()
    # Bright frames add 180 or more to the mean pixel and noise at most 30 per frame, so over 3 steps the predicted
    # order is always the true one; tied pairs must not count.
    accuracy = preference_accuracy(
        net, pairs.frames1, pairs.actions1, pairs.frames2, pairs.actions2, pairs.returns1, pairs.returns2, 5
    )
    assert net.training
    assert accuracy == 1.0
    flipped = preference_accuracy(
        net, pairs.frames1, pairs.actions1, pairs.frames2, pairs.actions2, pairs.returns2, pairs.returns1
    )
    assert math.isclose(accuracy + flipped, 1.0)
    tied = preference_accuracy(
        net, pairs.frames1, pairs.actions1, pairs.frames2, pairs.actions2, pairs.returns1, pairs.returns1
    )
    assert math.isnan(tied)


def test_reward_function_uses_eval_mode_and_taken_actions():
    torch.manual_seed(4)
    net = RewardCNN((4, 84, 84), 3).train()
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    actions = torch.tensor([0, 1, 2, 1, 0])
    rewards = reward_function(net)(obs, actions)
    assert not net.training
    expected = net.reference_forward(obs)[torch.arange(5), actions]
    torch.testing.assert_close(rewards, expected.detach())


@pytest.mark.parametrize("num_envs", [1, 2])
def test_each_pair_records_the_env_step_its_older_fragment_began(num_envs):
    """`collected` drives --implicit-pairs learned and reward/offpolicy_share: in a replay whose reward at each step
    is the env step it was taken at, a pair's collected step is the smaller first reward of its two fragments.
    Breaks if the age were off by one, or counted in vector steps instead of env steps. The behaviour probability
    mu, which the ratio corrections divide by, must be each step's own: breaks if a pair took the other fragment's
    or a neighbouring step's."""
    from types import SimpleNamespace

    from agents.lower.replay import FrameReplayBuffer
    from agents.pipeline.learner import PreferenceLearner

    buffer = FrameReplayBuffer(400, num_envs, (1, 4, 4), 1, "cpu")
    mu_of = lambda step: (0.1 + (np.asarray(step, np.float64) % 89) / 100).astype(np.float32)  # names its step
    steps = 150
    for vector_step in range(steps):
        env_step = vector_step * num_envs
        buffer.add(np.zeros((num_envs, 1, 4, 4), np.uint8), np.zeros(num_envs, np.int64),
                   np.full(num_envs, float(env_step)), np.zeros(num_envs, bool), np.zeros(num_envs, bool),
                   mu_of(np.full(num_envs, float(env_step))))  # fmt: skip
    trainer = SimpleNamespace(
        global_step=steps * num_envs,
        recent_fragments=lambda count, length, window, gen: buffer.recent_fragments(length, count, window, gen),
    )
    learner = object.__new__(PreferenceLearner)
    learner.trainer = trainer
    learner.args = SimpleNamespace(fragment_length=5, num_envs=num_envs)
    pairs = learner.sample_pairs(20, 100, torch.Generator().manual_seed(0))
    began = torch.minimum(pairs.rewards1[:, 0], pairs.rewards2[:, 0]).long()
    assert torch.equal(pairs.collected, began)
    assert len(set(pairs.collected.tolist())) > 5
    assert torch.equal(pairs.behaviour1, torch.from_numpy(mu_of(pairs.rewards1.numpy())))
    assert torch.equal(pairs.behaviour2, torch.from_numpy(mu_of(pairs.rewards2.numpy())))
