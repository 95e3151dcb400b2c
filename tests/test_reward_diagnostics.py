"""Reward diagnostics (does the learned reward order what the true one orders?), the frozen-reward check and fixed
run folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from agents.lower.replay import FrameReplayBuffer
from agents.pipeline.reward_training import average_ranks, learned_returns_of_steps, pearson, spearman
from tests.conftest import assert_usage_error, run_script, scalar_tags
from tests.test_replay import STACK, fill, make_fake_envs

# ---------------------------------------------------------------------------------------------------------------
# Correlations


def test_ranks_average_ties_and_correlations_match_scipy():
    x = np.array([3.0, 1.0, 3.0, 2.0, 0.0, 3.0])
    assert average_ranks(x).tolist() == [4.0, 1.0, 4.0, 2.0, 0.0, 4.0]
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, 50).astype(float)  # many ties, as fragment returns have
    b = a + rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b)[0], rel=1e-12)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0], rel=1e-12)


def test_correlations_are_nan_when_a_side_is_constant():
    assert np.isnan(pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))
    assert np.isnan(spearman([0.0, 1.0], [2.0, 2.0]))
    assert np.isnan(pearson([1.0], [2.0]))


def test_learned_returns_sum_each_segment_in_eval_mode():
    """Breaks if a step went to the wrong segment, or the net stayed in training mode (dropout)."""
    net = torch.nn.Sequential(torch.nn.Linear(1, 2, bias=False), torch.nn.Dropout(0.9))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [10.0]]))
    net.train()
    values = torch.arange(1.0, 7.0)
    actions = torch.tensor([0, 1, 0, 0, 1, 1])
    out = learned_returns_of_steps(net, lambda index: values[index, None], actions, torch.tensor([2, 3, 1]), chunk=4)
    assert out.tolist() == [1 + 20, 3 + 4 + 50, 60]
    assert net.training, "the net's mode is restored"


# ---------------------------------------------------------------------------------------------------------------
# Whole games in the replay


def game_boundaries(truth, num_envs):
    """From what the env did: per env, the (first slot, last slot) of every game that ended, in order."""
    games = {e: [] for e in range(num_envs)}
    start = {e: None for e in range(num_envs)}
    for (slot, env), (*_, real, _) in sorted(truth.items()):
        if not real:
            if start[env] is not None and slot > start[env]:
                games[env].append((start[env], slot - 1))
            start[env] = slot + 1
        elif start[env] is None:
            start[env] = slot
    return games


def test_completed_games_are_the_whole_games_the_env_played():
    """Breaks if a game still running, or cut by the window's start, were counted, or a game lost a step."""
    envs = make_fake_envs(2)
    buffer = FrameReplayBuffer(400, 2, (STACK, 8, 8), STACK, "cpu")
    truth = fill(buffer, envs, 150)
    slot, env, lengths = buffer.completed_games(150, max_games=100)
    expected = game_boundaries(truth, 2)
    found = {e: [] for e in range(2)}
    start = 0
    for length in lengths.tolist():
        slots, e = slot[start : start + length].tolist(), int(env[start])
        assert slots == list(range(slots[0], slots[-1] + 1)) and set(env[start : start + length].tolist()) == {e}
        found[e].append((slots[0], slots[-1]))
        start += length
    for e in range(2):
        assert sorted(found[e]) == expected[e], e
    # The step rewards are the env's: a game's true return is the sum of its actions (CountingFrames pays a).
    first = slot[: lengths[0]]
    assert float(buffer.rewards[first, env[: lengths[0]]].sum()) == sum(
        truth[(s, int(env[0]))][2] for s in first.tolist()
    )
    # A short window holds only the newest games; max_games keeps the newest.
    slot_few, _, lengths_few = buffer.completed_games(150, max_games=2)
    assert len(lengths_few) == 2 and slot_few[-1] == slot[-1]


# ---------------------------------------------------------------------------------------------------------------
# Runs: diagnostics logged, frozen reward, run folders

TINY_MINATAR = [
    "--env-id", "MinAtar/Breakout-v1", "--total-timesteps", "1500", "--buffer-size", "1500", "--learning-starts",
    "300", "--batch-size", "16", "--no-progress",
]  # fmt: skip
TINY_PREFERENCES = [
    "--inner-steps", "400", "--initial-pairs", "10", "--warmup-epochs", "2", "--total-pairs", "30",
    "--schedule-iterations", "3", "--pair-buffer", "30", "--fragment-length", "10",
]  # fmt: skip


@pytest.fixture(scope="module")
def drlhf_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run_script(
        "sobirl/beamrider.py", "--algo", "drlhf", *TINY_MINATAR, *TINY_PREFERENCES, "--runs-dir", str(runs),
        "--run-name", "drlhf",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return runs / "drlhf"


def test_a_preference_run_logs_the_correlations_and_the_labels_queried(drlhf_run):
    tags = scalar_tags(drlhf_run)
    for tag in ("reward/fresh_pearson", "reward/fresh_spearman", "reward/game_pearson", "reward/game_spearman"):
        assert tag in tags, tag
        assert tags[tag][-1][0] == 1500, "logged after the last agent phase too"
    assert [value for _, value in tags["reward/pairs_queried"]][-1] == 30
    assert all(0 < value <= 64 for _, value in tags["reward/games_scored"])


def test_the_diagnostics_do_not_change_the_run(drlhf_run, tmp_path):
    """Breaks if scoring fresh pairs or whole games drew from a generator the run uses, or left the net in another
    mode (the same seed with both off must give the same games)."""
    result = run_script(
        "sobirl/beamrider.py", "--algo", "drlhf", *TINY_MINATAR, *TINY_PREFERENCES, "--runs-dir", str(tmp_path),
        "--run-name", "off", "--fresh-pairs", "0", "--scored-games", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    off, on = scalar_tags(tmp_path / "off"), scalar_tags(drlhf_run)
    assert "reward/game_spearman" not in off
    assert off["charts/episodic_return"] == on["charts/episodic_return"]
    assert off["reward/bce"] == on["reward/bce"]


def test_sac_on_a_frozen_reward_learns_from_that_runs_reward_model(drlhf_run, tmp_path):
    result = run_script(
        "sobirl/beamrider.py", "--algo", "sac", *TINY_MINATAR, "--runs-dir", str(tmp_path), "--run-name", "frozen",
        "--frozen-reward", str(drlhf_run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    tags = scalar_tags(tmp_path / "frozen")
    assert "reward/sac_reward_mean" in tags, "the learned reward, not the game's, reached SAC"
    plain = run_script("sobirl/beamrider.py", "--algo", "sac", *TINY_MINATAR, "--total-timesteps", "800",
                       "--runs-dir", str(tmp_path), "--run-name", "plain")  # fmt: skip
    assert plain.returncode == 0 and "reward/sac_reward_mean" not in scalar_tags(tmp_path / "plain")


def test_a_frozen_reward_from_another_game_or_no_run_is_refused(drlhf_run, tmp_path):
    other = [*TINY_MINATAR, "--runs-dir", str(tmp_path)]
    other[1] = "MinAtar/SpaceInvaders-v1"
    result = run_script("sobirl/beamrider.py", "--algo", "sac", *other, "--frozen-reward", str(drlhf_run))
    assert_usage_error(result, "--frozen-reward", "MinAtar/Breakout-v1")
    result = run_script("sobirl/beamrider.py", "--algo", "sac", *other, "--frozen-reward", str(tmp_path / "none"))
    assert_usage_error(result, "--frozen-reward", "no checkpoint")
    assert not any(tmp_path.iterdir()), "nothing written"


def test_a_run_name_that_holds_a_run_or_a_path_is_refused(drlhf_run):
    result = run_script("sobirl/beamrider.py", "--algo", "drlhf", *TINY_MINATAR, *TINY_PREFERENCES, "--runs-dir",
                        str(drlhf_run.parent), "--run-name", "drlhf")  # fmt: skip
    assert_usage_error(result, "--run-name", "--resume")
    result = run_script("sobirl/beamrider.py", "--algo", "sac", "--run-name", "a/b")
    assert_usage_error(result, "--run-name")


# ---------------------------------------------------------------------------------------------------------------
# The epoch's diagnostics


def test_the_epochs_gradient_ratio_is_its_first_minibatchs_not_times_its_size():
    """Caught before: reward_epoch scaled every metric by its minibatch's size to average over pairs, the first
    minibatch's `extra_grad_ratio` too, which it then did not divide back: every logged ratio was the real one times
    the reward batch size (64 in every benchmark)."""
    import copy

    from agents.feedback.pairs import PairBuffer
    from agents.pipeline.ensemble import epoch_order
    from agents.pipeline.reward_training import reward_epoch, reward_update
    from agents.sobirl import SoBiRLLoss
    from tests.test_teachers import queries

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2 * 10 * 10, 4)

        def forward(self, obs):
            return self.layer(obs.float().flatten(1) / 255)

    torch.manual_seed(0)
    count, length = 8, 3
    pairs = queries([float(i) for i in range(count)], [0.0] * count, length=length)
    pairs.labels = torch.ones(count)
    buffer = PairBuffer(count, length, pairs.frames1.shape[2:], 1, "cpu")
    buffer.add(pairs)
    net, twin = Linear(), None
    twin = copy.deepcopy(net)
    loss = SoBiRLLoss(hyper_start=0)
    policy = lambda obs: torch.softmax(torch.ones(obs.shape[0], 4), -1)
    frozen = lambda model: torch.optim.SGD(model.parameters(), lr=0.0)
    stats = reward_epoch(net, frozen(net), buffer, 4, loss, global_step=10, policy_probs=policy,
                         generator=torch.Generator().manual_seed(3), diagnose=True)  # fmt: skip
    first = epoch_order(count, False, torch.Generator().manual_seed(3)).split(4)[0]
    twin.train()
    alone = reward_update(twin, frozen(twin), buffer.get(buffer.oldest_first()[first]), loss, 1.0, 10, policy,
                          diagnose=True)  # fmt: skip
    assert stats["extra_grad_ratio"] == pytest.approx(float(alone["extra_grad_ratio"]), rel=1e-6)
