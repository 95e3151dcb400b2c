"""Environment construction and preprocessing: `make_envs` returns a vectorized, preprocessed environment."""

from wrappers.atari import GameStatistics, InvalidEnvError, make_envs

__all__ = ["GameStatistics", "InvalidEnvError", "make_envs"]
