"""MinAtar through `make_envs`: the same contract as the Atari envs, so SAC and the replay buffer run unchanged."""

import sys

import numpy as np
import pytest

from tests.conftest import only_run_dir, run_script, scalar_tags
from wrappers import InvalidEnvError, make_envs

# Channels per game in minatar 1.0.15, and the size of its minimal action set.
GAMES = {"Asterix": (4, 5), "Breakout": (4, 3), "Freeway": (7, 3), "Seaquest": (10, 6), "SpaceInvaders": (6, 4)}


@pytest.fixture
def minatar():
    return pytest.importorskip("minatar")


def random_actions(envs, steps, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, envs.single_action_space.n, size=(steps, envs.num_envs))


def rollout(envs, actions):
    """Reset, then step through `actions`; returns the per-step (obs, reward, terminated, truncated, info)."""
    obs, _ = envs.reset()
    steps = [(obs, None, None, None, None)]
    for a in actions:
        steps.append(envs.step(a))
    envs.close()
    return steps


@pytest.mark.parametrize("game", sorted(GAMES))
def test_observations_are_channel_first_uint8_boards(minatar, game):
    channels, num_actions = GAMES[game]
    envs = make_envs(f"MinAtar/{game}-v1", num_envs=2, seed=1)
    assert envs.frame_stack == 1
    assert envs.single_observation_space.shape == (channels, 10, 10)
    assert envs.single_observation_space.dtype == np.uint8
    assert envs.single_action_space.n == num_actions
    for obs, *_ in rollout(envs, random_actions(envs, 50)):
        assert obs.shape == (2, channels, 10, 10) and obs.dtype == np.uint8
        # 255 for a set cell: the networks scale inputs by 1/255.
        assert set(np.unique(obs)) <= {0, 255}


def test_v0_uses_all_six_actions(minatar):
    envs = make_envs("MinAtar/Breakout-v0", num_envs=1, seed=1)
    assert envs.single_action_space.n == 6
    envs.close()


def test_game_end_reports_true_return_and_length_then_resets(minatar):
    envs = make_envs("MinAtar/Breakout-v1", num_envs=2, seed=3)
    steps = rollout(envs, random_actions(envs, 400))
    score, length, games, reset_step = np.zeros(2), np.zeros(2, dtype=int), 0, np.zeros(2, dtype=bool)
    for obs, reward, terminated, truncated, info in steps[1:]:
        raw = info["raw_reward"]
        np.testing.assert_array_equal(reward, np.sign(raw))
        assert not truncated.any()
        for e in range(2):
            if reset_step[e]:
                # NEXT_STEP autoreset: this step only started a new game, from its first board.
                assert raw[e] == 0 and not terminated[e]
                assert obs[e, 3].sum() == 30 * 255, "a new game starts with three full rows of bricks"
                assert obs[e, 0, 9, 4] == 255, "the paddle starts in the middle"
                score[e], length[e] = 0, 0
                continue
            score[e] += raw[e]
            length[e] += 1
        np.testing.assert_array_equal(info["game_over"], terminated)  # no lives: every terminal ends the game
        if info["game_over"].any():
            assert info["_episode"].tolist() == info["game_over"].tolist()
            for e in np.nonzero(info["game_over"])[0]:
                assert info["episode"]["r"][e] == score[e]
                assert info["episode"]["l"][e] == length[e]
                games += 1
        else:
            assert "episode" not in info
        reset_step = info["game_over"]
    assert games >= 10
    assert sum(s[4]["episode"]["r"].sum() for s in steps[1:] if "episode" in s[4]) > 0, "random play breaks bricks"


def test_max_episode_frames_truncates_games(minatar):
    # Freeway only ends by its own 2,500-frame clock, so every game here is cut by the step limit.
    envs = make_envs("MinAtar/Freeway-v1", num_envs=1, seed=0, max_episode_frames=30)
    ends = [s for s in rollout(envs, random_actions(envs, 100))[1:] if s[4]["game_over"][0]]
    assert len(ends) == 3
    for _, _, terminated, truncated, info in ends:
        assert truncated[0] and not terminated[0]
        assert info["episode"]["l"][0] == 30


def test_same_seed_same_games_and_sub_env_i_gets_seed_plus_i(minatar):
    def observations(num_envs, seed, actions):
        envs = make_envs("MinAtar/SpaceInvaders-v1", num_envs=num_envs, seed=seed)
        return np.stack([s[0] for s in rollout(envs, actions)])

    actions = random_actions(make_envs("MinAtar/SpaceInvaders-v1", 2, 0), 300)
    first = observations(2, 5, actions)
    np.testing.assert_array_equal(first, observations(2, 5, actions))
    np.testing.assert_array_equal(first[:, 1], observations(1, 6, actions[:, 1:])[:, 0])
    assert not np.array_equal(first, observations(2, 7, actions))


def test_sticky_actions_follow_the_seed(minatar):
    def paddle_columns(seed):
        envs = make_envs("MinAtar/Breakout-v1", num_envs=1, seed=seed, sticky_action_prob=0.5)
        right = np.full((40, 1), 2)  # minimal action set: no-op, left, right
        return [int(s[0][0, 0, 9].argmax()) for s in rollout(envs, right)]

    assert paddle_columns(1) == paddle_columns(1)
    assert paddle_columns(1) != paddle_columns(2)


@pytest.mark.parametrize("env_id", ["MinAtar/Pong-v1", "MinAtar/Breakout-v2", "MinAtar/breakout-v1", "MinAtar/"])
def test_unknown_minatar_ids_are_refused(minatar, env_id):
    with pytest.raises(InvalidEnvError, match="--env-id"):
        make_envs(env_id, num_envs=1, seed=0)


def test_missing_package_tells_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "minatar", None)
    monkeypatch.setitem(sys.modules, "minatar.environments", None)
    with pytest.raises(InvalidEnvError, match=r'--env-id .*pip install -e "\.\[minatar\]"'):
        make_envs("MinAtar/Breakout-v1", num_envs=1, seed=0)


def test_atari_options_are_not_accepted_for_minatar(minatar):
    with pytest.raises(TypeError):
        make_envs("MinAtar/Breakout-v1", num_envs=1, seed=0, noop_max=0)


def test_sac_runs_on_minatar(minatar, tmp_path, monkeypatch):
    # Tiny networks: intra-op threads only add synchronization, and CI runs tests side by side.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script(
        "agents/sac_discrete.py",
        "--env-id",
        "MinAtar/Breakout-v1",
        "--total-timesteps",
        "400",
        "--learning-starts",
        "200",
        "--buffer-size",
        "1000",
        "--batch-size",
        "32",
        "--log-every",
        "10",
        "--no-progress",
        "--runs-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("MinAtar-Breakout-v1__sac_discrete__1__"), "the id's '/' does not nest the run"
    tags = scalar_tags(run_dir)
    returns = [value for _, value in tags["charts/episodic_return"]]
    assert len(returns) >= 5 and min(returns) >= 0
    assert "losses/qf_loss" in tags


def test_sobirl_runs_on_minatar(minatar, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script(
        "agents/sobirl.py",
        "--env-id",
        "MinAtar/SpaceInvaders-v1",
        "--total-timesteps",
        "600",
        "--learning-starts",
        "100",
        "--buffer-size",
        "2000",
        "--batch-size",
        "16",
        "--initial-pairs",
        "8",
        "--warmup-epochs",
        "2",
        "--inner-steps",
        "100",
        "--fragment-length",
        "10",
        "--pair-buffer",
        "40",
        "--total-pairs",
        "40",
        "--schedule-iterations",
        "5",
        "--hyper-start",
        "200",
        "--no-progress",
        "--runs-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(only_run_dir(tmp_path))
    assert {"reward/bce", "reward/hyper_term", "charts/episodic_return"} <= set(tags)
    assert any(value != 0 for _, value in tags["reward/hyper_term"]), "the implicit term switched on after 200 steps"
