"""Vectorized Atari with the preprocessing of the SoBiRL paper (DQN / SB3 AtariWrapper semantics).

ale-py's native multi-threaded `AtariVectorEnv` already does no-op starts, frame skip with max-pooling, FIRE on
reset, 84x84 grayscale and the 4-frame stack, and it can flag a lost life as `terminated` while the game goes
on (`life_loss_info=True`, the DQN episodic-life semantics). What it lacks is written here, in `GameStatistics`:

* the true game score: the env is built with `reward_clipping=False` so the wrapper can sum the raw rewards over a
  whole game (all lives) while handing the learner sign-clipped rewards;
* gymnasium-style `info["episode"]` / `info["_episode"]` at the step a game (not a life) ends;
* `info["game_over"]`: the game ended at this step, so with NEXT_STEP autoreset the next step is a reset step whose
  transition (terminal frame -> first frame of the next game) is not real and must not be learned from;
* `send(actions)` / `recv()`: a step split in two, as ale-py's vector env splits it (its `step` is `send` then
  `recv`; between them the emulator threads step while the caller does other work, the learner's updates with
  `--async-envs`). `steps_in_background` says whether the wrapped env has that split; without it (MinAtar's
  `SyncVectorEnv`) `send` only keeps the actions and `recv` steps synchronously, so the same calls work everywhere.
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym
import numpy as np

from wrappers.errors import InvalidEnvError

# gymnasium's Atari ids and the sticky-action probability each implies; frame skipping is done by the wrapper, so
# ids with built-in (or random) frame skipping other than v5's fixed 4 are refused rather than silently changed.
_ATARI_ID = re.compile(r"^(?:(?P<game>[A-Za-z]+)NoFrameskip-v(?P<version>[04])|ALE/(?P<v5game>[A-Za-z]+)-v5)$")
_STICKY_ACTIONS = {"0": 0.25, "4": 0.0, "5": 0.25}


def _snake_case(game: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()


def atari_game(env_id: str) -> tuple[str, float]:
    """Map a gymnasium Atari id to (ale-py ROM id, sticky-action probability); raise InvalidEnvError if unknown."""
    import ale_py.roms

    match = _ATARI_ID.match(env_id)
    if match is None:
        raise InvalidEnvError(
            f"--env-id {env_id!r} is not an Atari id of the form <Game>NoFrameskip-v4 or ALE/<Game>-v5 "
            "(nor a MinAtar/<Game>-v1 id)"
        )
    camel = match["game"] or match["v5game"]
    game = _snake_case(camel)
    if game not in ale_py.roms.get_all_rom_ids():
        raise InvalidEnvError(f"--env-id {env_id!r}: unknown Atari game {camel!r}")
    return game, _STICKY_ACTIONS[match["version"] or "5"]


ALE_SEEDS = 2**31  # ale-py takes seeds in [0, 2**31)


def fold_seed(seed: int, num_envs: int, seeds: int = ALE_SEEDS) -> int:
    """A seed for `num_envs` sub-envs seeded seed, seed + 1, ..., each below `seeds`: a run derives its env seeds
    from --seed (up to 2**32 - 1) plus step counts. Seeds that fit are kept as they are."""
    return seed % (seeds - num_envs + 1)


class GameStatistics(gym.vector.VectorWrapper):
    """Clip rewards to their sign and report true whole-game scores the gymnasium way.

    Expects an env whose rewards are raw game points. With `info["lives"]` (ale-py), life losses are flagged as
    `terminated` (`life_loss_info=True`) and a game is over when a step is terminated with no lives left; without it
    (games with no lives, such as MinAtar's) every terminated step is a game over. A truncated step always is.
    """

    def __init__(
        self,
        env: gym.vector.VectorEnv,
        clip_rewards: bool = True,
        seed: int | None = None,
        frame_stack: int = 4,
        fire_after_life_loss: bool = False,
        seeds: int | None = None,
    ):
        super().__init__(env)
        self.seeds = seeds  # how many seeds the wrapped env takes (None: any int)
        # SB3's AtariWrapper (EpisodicLifeEnv inside FireResetEnv), which the authors used, "resets" after each lost
        # life with a no-op, FIRE and action 2; ale-py fires only at a game's start. One env only (the extra steps
        # would move every sub-env).
        if fire_after_life_loss and self.num_envs != 1:
            raise InvalidEnvError(f"--fire-after-life-loss needs --num-envs 1, got {self.num_envs}")
        self.fire_after_life_loss = fire_after_life_loss
        self.frame_stack = frame_stack  # observations are (frame_stack, H, W); the replay buffer stores frames once
        self.clip_rewards = clip_rewards
        self._first_reset_seed = seed
        self._score = np.zeros(self.num_envs, dtype=np.float64)
        self._length = np.zeros(self.num_envs, dtype=np.int64)
        self._reset_next = np.zeros(self.num_envs, dtype=bool)
        self._sent: np.ndarray | None = None  # the actions of a `send` whose `recv` is still to come

    @property
    def steps_in_background(self) -> bool:
        """Whether the wrapped env steps between `send` and `recv` (ale-py's vector env) rather than inside `recv`."""
        return callable(getattr(self.env, "send", None)) and callable(getattr(self.env, "recv", None))

    def send(self, actions) -> None:
        """Start a step with `actions`; `recv` returns what `step(actions)` would have returned."""
        if self._sent is not None:
            raise RuntimeError("send called twice without a recv in between")
        self._sent = np.array(actions, copy=True)
        if self.steps_in_background:
            self.env.send(actions)

    def recv(self):
        """Finish the step `send` started (on an env without `send`/`recv`, take it now)."""
        if self._sent is None:
            raise RuntimeError("recv called without a send")
        actions, self._sent = self._sent, None
        return self._finish_step(self.env.recv() if self.steps_in_background else self.env.step(actions))

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        if seed is None:
            seed, self._first_reset_seed = self._first_reset_seed, None
        if isinstance(seed, int) and self.seeds is not None:
            seed = fold_seed(seed, self.num_envs, self.seeds)
        if self._sent is not None:
            raise RuntimeError("reset between send and recv")
        obs, info = self.env.reset(seed=seed, options=options)
        self._score[:] = 0.0
        self._length[:] = 0
        self._reset_next[:] = False
        return obs, info

    def step(self, actions):
        return self._finish_step(self.env.step(actions))

    def _finish_step(self, result):
        """The statistics and clipping of one step of the wrapped env (`step`'s or `recv`'s result)."""
        obs, reward, terminated, truncated, info = result
        reward = np.asarray(reward, dtype=np.float64)
        was_reset_step = self._reset_next.copy()
        # A NEXT_STEP reset step starts a new game: its reward is 0 and it is not part of any game's length.
        self._score[was_reset_step] = 0.0
        self._length[was_reset_step] = 0
        self._score += reward
        self._length += ~was_reset_step
        out_of_lives = np.asarray(info["lives"]) <= 0 if "lives" in info else True
        game_over = (terminated & out_of_lives) | truncated
        if self.fire_after_life_loss and terminated[0] and not game_over[0]:
            for action in (0, 1, 2):
                obs, extra, extra_terminated, extra_truncated, info = self.env.step(np.array([action]))
                self._score += np.asarray(extra, dtype=np.float64)
                game_over = game_over | (extra_terminated & (np.asarray(info["lives"]) <= 0)) | extra_truncated
                if game_over[0]:
                    break
        if game_over.any():
            # Atari counts a game's length in emulator frames too (the paper's plots); MinAtar has no frame skip.
            frames = np.asarray(info["episode_frame_number"]) if "episode_frame_number" in info else self._length
            info["episode"] = {
                "r": np.where(game_over, self._score, 0.0),
                "l": np.where(game_over, self._length, 0),
                "frames": np.where(game_over, frames, 0),
            }
            info["_episode"] = game_over
        info["game_over"] = game_over
        info["raw_reward"] = reward
        self._reset_next = game_over
        learner_reward = np.sign(reward).astype(np.float32) if self.clip_rewards else reward.astype(np.float32)
        return obs, learner_reward, terminated, truncated, info


def make_atari_envs(
    env_id: str = "BeamRiderNoFrameskip-v4",
    num_envs: int = 1,
    seed: int = 1,
    *,
    noop_max: int = 30,
    frame_skip: int = 4,
    stack: int = 4,
    screen_size: int = 84,
    terminal_on_life_loss: bool = True,
    fire_reset: bool = True,
    clip_rewards: bool = True,
    max_episode_frames: int = 108_000,
    num_threads: int = 0,
    fire_after_life_loss: bool = False,
) -> gym.vector.VectorEnv:
    """Preprocessed vectorized Atari: observations (num_envs, stack, 84, 84) uint8, rewards in {-1, 0, 1}.

    Defaults are the paper's (SB3 `AtariWrapper` on `*NoFrameskip-v4`). The env uses NEXT_STEP autoreset; call
    `reset()` once: the first reset seeds sub-env i with `seed + i`. `info["episode"]` carries the unclipped score of
    a whole game and its length in agent steps, at the step the game ends.
    """
    from ale_py.vector_env import AtariVectorEnv

    if num_envs <= 0:
        raise InvalidEnvError(f"--num-envs must be positive, got {num_envs}")
    game, sticky = atari_game(env_id)
    envs = AtariVectorEnv(
        game,
        num_envs,
        num_threads=num_threads,
        max_num_frames_per_episode=max_episode_frames,
        repeat_action_probability=sticky,
        img_height=screen_size,
        img_width=screen_size,
        stack_num=stack,
        frameskip=frame_skip,
        noop_max=noop_max,
        episodic_life=False,
        life_loss_info=terminal_on_life_loss,
        reward_clipping=False,
        use_fire_reset=fire_reset,
    )
    return GameStatistics(
        envs,
        clip_rewards=clip_rewards,
        seed=seed,
        frame_stack=stack,
        fire_after_life_loss=fire_after_life_loss,
        seeds=ALE_SEEDS,
    )
