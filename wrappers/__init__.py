"""Environment construction and preprocessing: `make_envs` returns a vectorized, preprocessed environment.

gymnasium, ale-py and minatar are imported on first use, so light tools (the sweep and plot scripts) can import
`wrappers.errors` without loading them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wrappers.errors import InvalidEnvError

if TYPE_CHECKING:
    import gymnasium as gym

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
    from wrappers.minatar import is_minatar_id

    if is_minatar_id(env_id):
        from wrappers.minatar import make_minatar_envs

        return make_minatar_envs(env_id, num_envs, seed, max_episode_steps=max_episode_frames, **options)
    from wrappers.atari import make_atari_envs

    return make_atari_envs(env_id, num_envs, seed, max_episode_frames=max_episode_frames, **options)


def __getattr__(name: str):
    if name in ("GameStatistics", "make_atari_envs"):
        import wrappers.atari

        return getattr(wrappers.atari, name)
    if name == "make_minatar_envs":
        import wrappers.minatar

        return wrappers.minatar.make_minatar_envs
    raise AttributeError(f"module 'wrappers' has no attribute {name!r}")
