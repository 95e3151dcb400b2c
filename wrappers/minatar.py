"""MinAtar (Young & Tian, 2019): 10x10 miniatures of Atari games, a proving ground small enough for a CPU.

Ids are the ones the `minatar` package registers with gymnasium: `MinAtar/<Game>-v1` plays with the game's minimal
action set, `MinAtar/<Game>-v0` with all six actions. The package's own gymnasium env is not used: it needs an
explicit `register_envs` and hands out bool (10, 10, C) boards, so each game is driven here through
`minatar.Environment`, which also does the sticky actions (probability 0.1 by default, as in the MinAtar paper).

What the learner sees matches the Atari pipeline, so SAC, the replay buffer and the reward models run unchanged:

* observations are uint8 (C, 10, 10), channel-first, 255 where a channel is set: the networks scale inputs by
  1/255 (for Atari pixels), so 0/1 boards would reach them as 0 or 0.004;
* no frame stack (`frame_stack = 1`): a MinAtar board already shows motion (trail channels, directions);
* the games have no lives, so every `terminated` is a game over; `GameStatistics` reports whole-game scores in
  `info["episode"]` and flags `info["game_over"]` for the NEXT_STEP autoreset that follows;
* rewards are clipped to their sign like Atari's (Seaquest and SpaceInvaders can pay more than 1 in a step); the
  raw score is in `info["raw_reward"]` and in the episode return.

MinAtar has no frame skip, so one agent step is one frame and the Atari frame cap `max_episode_frames` becomes a
step cap `max_episode_steps` (a truncation, not a terminal).
"""

from __future__ import annotations

import pkgutil
import re
from typing import Any

import gymnasium as gym
import numpy as np

from wrappers.atari import GameStatistics
from wrappers.errors import InvalidEnvError

PREFIX = "MinAtar/"
_MINATAR_ID = re.compile(r"^MinAtar/(?P<game>[A-Za-z]+)-v(?P<version>[01])$")
_INSTALL_HINT = 'MinAtar games need the minatar package: pip install -e ".[minatar]"'


def is_minatar_id(env_id: str) -> bool:
    return env_id.startswith(PREFIX)


def _camel_case(module: str) -> str:
    return "".join(part.title() for part in module.split("_"))


def minatar_game(env_id: str) -> tuple[str, bool]:
    """Map `MinAtar/<Game>-v<0|1>` to (minatar game module name, use the minimal action set); raise InvalidEnvError
    if the id is malformed, the game unknown, or minatar not installed."""
    match = _MINATAR_ID.match(env_id)
    if match is None:
        raise InvalidEnvError(f"--env-id {env_id!r} is not a MinAtar id of the form MinAtar/<Game>-v1 (or -v0)")
    try:
        import minatar.environments
    except ImportError:
        raise InvalidEnvError(f"--env-id {env_id!r}: {_INSTALL_HINT}") from None
    # The installed package decides which games exist, so newer minatar releases need no change here.
    games = {_camel_case(m.name): m.name for m in pkgutil.iter_modules(minatar.environments.__path__)}
    if match["game"] not in games:
        raise InvalidEnvError(
            f"--env-id {env_id!r}: unknown MinAtar game {match['game']!r}; known: {', '.join(sorted(games))}"
        )
    return games[match["game"]], match["version"] == "1"


class MinAtarGame(gym.Env):
    """One MinAtar game as a gymnasium env with channel-first uint8 observations (see the module docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, game: str, minimal_actions: bool = True, sticky_action_prob: float = 0.1):
        from minatar import Environment

        self.game = Environment(game, sticky_action_prob=sticky_action_prob)
        all_actions = range(self.game.num_actions())
        self.action_set = list(self.game.minimal_action_set() if minimal_actions else all_actions)
        height, width, channels = self.game.state_shape()
        self.action_space = gym.spaces.Discrete(len(self.action_set))
        self.observation_space = gym.spaces.Box(0, 255, shape=(channels, height, width), dtype=np.uint8)

    def _observation(self) -> np.ndarray:
        return self.game.state().transpose(2, 0, 1).astype(np.uint8) * np.uint8(255)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            # One RandomState drives both the sticky actions and the game's own randomness.
            self.game.seed(seed)
        self.game.reset()
        return self._observation(), {}

    def step(self, action):
        reward, terminated = self.game.act(self.action_set[int(action)])
        return self._observation(), float(reward), bool(terminated), False, {}


def make_minatar_envs(
    env_id: str = "MinAtar/Breakout-v1",
    num_envs: int = 1,
    seed: int = 1,
    *,
    sticky_action_prob: float = 0.1,
    max_episode_steps: int | None = 108_000,
    clip_rewards: bool = True,
) -> gym.vector.VectorEnv:
    """Vectorized MinAtar game: observations (num_envs, C, 10, 10) uint8 in {0, 255}, rewards clipped to {0, 1}.

    Same contract as the Atari `make_envs`: NEXT_STEP autoreset, the first `reset()` seeds sub-env i with
    `seed + i` (its sticky actions included), `info["episode"]` carries a whole game's raw score and length in agent
    steps at the step it ends. Games longer than `max_episode_steps` are truncated (None: never).
    """
    if num_envs <= 0:
        raise InvalidEnvError(f"--num-envs must be positive, got {num_envs}")
    game, minimal_actions = minatar_game(env_id)
    if not 0.0 <= sticky_action_prob <= 1.0:
        raise InvalidEnvError(f"sticky-action probability must be in [0, 1], got {sticky_action_prob}")

    def make_one() -> gym.Env:
        env = MinAtarGame(game, minimal_actions, sticky_action_prob)
        if max_episode_steps:
            env = gym.wrappers.TimeLimit(env, max_episode_steps)
        return env

    envs = gym.vector.SyncVectorEnv(
        [make_one for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP
    )
    return GameStatistics(envs, clip_rewards=clip_rewards, seed=seed, frame_stack=1)
