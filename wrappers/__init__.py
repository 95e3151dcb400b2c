"""Environment construction and preprocessing: `make_envs` returns a vectorized, preprocessed environment."""

from __future__ import annotations

import gymnasium as gym

from wrappers.atari import GameStatistics, InvalidEnvError, make_atari_envs
from wrappers.minatar import is_minatar_id, make_minatar_envs

__all__ = ["GameStatistics", "InvalidEnvError", "make_atari_envs", "make_envs", "make_minatar_envs"]


def make_envs(
    env_id: str = "BeamRiderNoFrameskip-v4",
    num_envs: int = 1,
    seed: int = 1,
    *,
    max_episode_frames: int = 108_000,
    **options,
) -> gym.vector.VectorEnv:
    """The vector env for `env_id`: `MinAtar/<Game>-v1` ids go to `make_minatar_envs`, all others to the Atari
    `make_atari_envs`, each with its own keyword `options`.

    MinAtar has no frame skip, so `max_episode_frames` is its step limit (one step is one frame).
    """
    if is_minatar_id(env_id):
        return make_minatar_envs(env_id, num_envs, seed, max_episode_steps=max_episode_frames, **options)
    return make_atari_envs(env_id, num_envs, seed, max_episode_frames=max_episode_frames, **options)
