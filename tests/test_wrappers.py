"""Semantics of `make_envs` on the real BeamRider ROM."""

import numpy as np
import pytest

from wrappers import InvalidEnvError, make_envs


def random_actions(rng, envs):
    return rng.integers(0, envs.single_action_space.n, size=envs.num_envs)


def test_shapes_dtypes_and_clipped_rewards():
    envs = make_envs("BeamRiderNoFrameskip-v4", num_envs=2, seed=1)
    obs, info = envs.reset()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    assert envs.single_action_space.n == 9
    rng = np.random.default_rng(0)
    rewards = []
    for _ in range(300):
        obs, reward, terminated, truncated, info = envs.step(random_actions(rng, envs))
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        rewards.append(reward)
    rewards = np.concatenate(rewards)
    assert set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}
    assert (rewards == 1.0).any(), "random play scores within 300 steps of BeamRider"
    envs.close()


def test_life_loss_is_terminal_but_the_game_goes_on_and_true_score_is_reported():
    envs = make_envs("BeamRiderNoFrameskip-v4", num_envs=1, seed=3)
    obs, info = envs.reset()
    rng = np.random.default_rng(1)
    lives = int(info["lives"][0])
    clipped_sum, raw_sum, life_losses = 0.0, 0.0, 0
    while True:
        frame_before = int(info["episode_frame_number"][0])
        obs, reward, terminated, truncated, info = envs.step(random_actions(rng, envs))
        clipped_sum += float(reward[0])
        raw_sum += float(info["raw_reward"][0])
        if info["game_over"][0]:
            break
        if terminated[0]:
            # A lost life: terminal for the learner, but the same game continues with one life fewer.
            life_losses += 1
            assert "_episode" not in info
            assert int(info["lives"][0]) == lives - 1
            lives -= 1
            assert int(info["episode_frame_number"][0]) > frame_before
            obs, reward, terminated, truncated, info = envs.step(random_actions(rng, envs))
            clipped_sum += float(reward[0])
            raw_sum += float(info["raw_reward"][0])
            assert int(info["lives"][0]) == lives, "the step after a life loss continues the same game"
            assert not (obs[0, :3] == 0).all(), "the frame stack is not reset on a life loss"
    assert life_losses >= 1
    assert info["_episode"][0]
    score, length = float(info["episode"]["r"][0]), int(info["episode"]["l"][0])
    assert score == raw_sum
    assert clipped_sum > 0 and score > clipped_sum, "BeamRider points are worth more than 1 each"
    assert length > 0
    # NEXT_STEP autoreset: the following step starts a new game with a zero-padded stack and full lives.
    obs, reward, terminated, truncated, info = envs.step(random_actions(rng, envs))
    assert reward[0] == 0 and not terminated[0]
    assert int(info["lives"][0]) == 3
    assert (obs[0, :3] == 0).all() and obs[0, 3].any()
    envs.close()


def test_noop_starts_depend_on_the_seed_and_can_be_disabled():
    starts = set()
    for seed in range(4):
        envs = make_envs("BeamRiderNoFrameskip-v4", num_envs=1, seed=seed)
        _, info = envs.reset()
        starts.add(int(info["episode_frame_number"][0]))
        envs.close()
    assert len(starts) > 1, "up to 30 random no-ops make the start frame vary with the seed"
    envs = make_envs("BeamRiderNoFrameskip-v4", num_envs=1, seed=0, noop_max=0, fire_reset=False)
    _, info = envs.reset()
    assert int(info["episode_frame_number"][0]) == 0
    envs.close()
    envs = make_envs("BeamRiderNoFrameskip-v4", num_envs=1, seed=0, noop_max=0, fire_reset=True)
    _, info = envs.reset()
    assert int(info["episode_frame_number"][0]) > 0, "FIRE on reset advances the emulator"
    envs.close()


@pytest.mark.parametrize("env_id", ["Foo", "BeamRider-v4", "NotAGameNoFrameskip-v4", "CartPole-v1"])
def test_unknown_env_ids_are_refused(env_id):
    with pytest.raises(InvalidEnvError, match="--env-id"):
        make_envs(env_id, num_envs=1, seed=0)
