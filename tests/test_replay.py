"""The frame replay buffer must give back exactly the stacks the environment produced."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.lower.replay import FrameReplayBuffer

STACK = 4


class CountingFrames(gym.Env):
    """8x8 frames that encode (env, global frame counter); episodes end by termination or truncation at random."""

    observation_space = gym.spaces.Box(0, 255, (8, 8), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, env_index: int):
        self.env_index = env_index
        self.counter = 0

    def _frame(self):
        self.counter += 1
        frame = np.zeros((8, 8), np.uint8)
        frame[0, 0] = self.counter % 251 + 1
        frame[0, 1] = self.counter // 251 % 251 + 1
        frame[0, 2] = self.env_index + 1
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._frame(), {}

    def step(self, action):
        u = self.np_random.random()
        return self._frame(), float(action), bool(u < 0.08), bool(0.08 <= u < 0.12), {}


def make_fake_envs(num_envs: int):
    fns = [
        lambda i=i: gym.wrappers.FrameStackObservation(CountingFrames(i), STACK, padding_type="zero")
        for i in range(num_envs)
    ]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def fill(buffer, envs, steps, seed=0):
    """Drive the env like the trainer does; return {(slot, env): (obs, action, reward, next_obs, terminated, real,
    behaviour probability)}."""
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    autoreset = np.zeros(envs.num_envs, bool)
    truth = {}
    for _ in range(steps):
        slot = buffer.pos
        actions = rng.integers(0, 3, envs.num_envs)
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        behaviour = rng.uniform(0.05, 1.0, envs.num_envs).astype(np.float32)
        buffer.add(obs, actions, rewards, terminated, autoreset, behaviour)
        for e in range(envs.num_envs):
            truth[(slot, e)] = (
                obs[e].copy(),
                actions[e],
                rewards[e],
                next_obs[e].copy(),
                terminated[e],
                not autoreset[e],
                behaviour[e],
            )
        obs, autoreset = next_obs, terminated | truncated
    return truth


@pytest.mark.parametrize("num_envs,steps", [(1, 40), (3, 40), (3, 500)])
def test_every_sampleable_transition_matches_the_env(num_envs, steps):
    envs = make_fake_envs(num_envs)
    buffer = FrameReplayBuffer(64 * num_envs, num_envs, (STACK, 8, 8), STACK, "cpu")
    truth = fill(buffer, envs, steps)  # 500 steps wrap the 64-slot ring several times
    slots, env_ids = buffer.sampleable.nonzero(as_tuple=True)
    assert len(slots) > 0
    obs = buffer.stacks(slots, env_ids).numpy()
    next_obs = buffer.stacks((slots + 1) % buffer.slots, env_ids).numpy()
    for i, (s, e) in enumerate(zip(slots.tolist(), env_ids.tolist())):
        t_obs, t_action, t_reward, t_next, t_term, real, _ = truth[(s, e)]
        assert real, "the autoreset step (terminal obs -> next game's first obs) is never sampleable"
        np.testing.assert_array_equal(obs[i], t_obs)
        np.testing.assert_array_equal(next_obs[i], t_next)
        assert buffer.actions[s, e] == t_action and buffer.rewards[s, e] == t_reward
        assert bool(buffer.terminated[s, e]) == bool(t_term)
    # Everything real and complete is sampleable, except slots whose history the write head overwrote.
    newest = (buffer.pos - 1) % buffer.slots
    for (s, e), (*_, real, _) in truth.items():
        if not real or s == newest:
            assert not buffer.sampleable[s, e]
        elif steps <= buffer.slots:
            assert buffer.sampleable[s, e]
    if steps > buffer.slots:
        lost = [(buffer.pos + k) % buffer.slots for k in range(STACK - 1)]  # just after the newest slot
        assert not buffer.sampleable[lost].any()


def test_sample_returns_consistent_batches():
    envs = make_fake_envs(2)
    buffer = FrameReplayBuffer(200, 2, (STACK, 8, 8), STACK, "cpu")
    fill(buffer, envs, 150)
    gen = torch.Generator().manual_seed(0)
    batch = buffer.sample(32, gen)
    assert batch.obs.shape == (32, STACK, 8, 8) and batch.obs.dtype == torch.uint8
    assert batch.next_obs.shape == (32, STACK, 8, 8)
    assert batch.actions.dtype == torch.int64 and batch.terminated.dtype == torch.float32
    # Real transitions never cross a game start, so next_obs is obs shifted by one frame.
    np.testing.assert_array_equal(batch.next_obs[:, :-1].numpy(), batch.obs[:, 1:].numpy())
    again = buffer.sample(32, torch.Generator().manual_seed(0))
    assert torch.equal(again.obs, batch.obs), "sampling is reproducible for a seeded generator"


@pytest.mark.parametrize("capacity,steps", [(400, 180), (160, 500)])  # the second wraps the ring several times
def test_fragments_stay_inside_one_episode_and_match_the_env(capacity, steps):
    envs = make_fake_envs(2)
    buffer = FrameReplayBuffer(capacity, 2, (STACK, 8, 8), STACK, "cpu")
    truth = fill(buffer, envs, steps)
    length = 5
    fragments = buffer.recent_fragments(length, 50, 60, torch.Generator().manual_seed(1))
    assert fragments.frames.shape == (50, length + STACK - 1, 8, 8)
    # Observations are unique per env and step (CountingFrames), so each identifies its transition.
    by_obs = {v[0].tobytes(): (k, v) for k, v in truth.items() if v[5]}
    starts = 0
    for f, a, r, mu in zip(
        *(x.numpy() for x in (fragments.frames, fragments.actions, fragments.rewards, fragments.behaviour))
    ):
        starts += int(not f[0].any())
        for h in range(length):
            key = f[h : h + STACK].tobytes()
            assert key in by_obs, "each fragment step is an observation the env produced"
            (_, _), (_, t_action, t_reward, _, t_term, real, t_mu) = by_obs[key]
            assert real and t_action == a[h] and t_reward == r[h]
            assert t_mu == mu[h], "the behaviour probability is the one stored with the step"
            if h < length - 1:
                assert not t_term, "only the last step of a fragment may end an episode"
    assert starts > 0, "some fragments begin at an episode start (zero-padded history)"


def test_sampling_never_returns_unusable_transitions():
    envs = make_fake_envs(3)
    buffer = FrameReplayBuffer(90, 3, (STACK, 8, 8), STACK, "cpu")
    fill(buffer, envs, 400)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        buffer.sample(32, generator)
    assert int(buffer.invalid_draws) == 0


def test_checkpoint_holds_only_the_written_slots():
    envs = make_fake_envs(2)
    buffer = FrameReplayBuffer(1000, 2, (STACK, 8, 8), STACK, "cpu")
    fill(buffer, envs, 30)
    state = buffer.state_dict()
    rows = state["rows"]  # saved as chunk files beside the checkpoint (agents/infra/checkpoint.py)
    assert rows.rows == 30 and len(rows) == 1 and rows.chunk(0)["behaviour"].shape == (30, 2)
    restored = FrameReplayBuffer(1000, 2, (STACK, 8, 8), STACK, "cpu")
    restored.load_state_dict(state)
    slots, env_ids = buffer.sampleable.nonzero(as_tuple=True)
    assert torch.equal(restored.sampleable, buffer.sampleable)
    assert torch.equal(restored.stacks(slots, env_ids), buffer.stacks(slots, env_ids))
    with pytest.raises(ValueError, match="replay"):
        FrameReplayBuffer(500, 2, (STACK, 8, 8), STACK, "cpu").load_state_dict(state)


def test_bytes_per_transition_is_one_frame_plus_small_fields():
    buffer = FrameReplayBuffer(1000, 1, (4, 84, 84), 4, "cpu")
    assert 84 * 84 <= buffer.bytes_per_transition <= 7200


def test_too_small_buffer_is_refused():
    with pytest.raises(ValueError, match="per env"):
        FrameReplayBuffer(10, 4, (4, 84, 84), 4, "cpu")
