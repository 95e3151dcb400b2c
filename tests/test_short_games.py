"""Fragments when the first games are shorter than a fragment (a small label budget on a game whose random play dies
fast: the headroom pilot's Breakout at 50 labels, seed 302): the trainer plays on until some game lasts a fragment,
and takes no extra step when the window already holds one."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.infra.cli import UsageError
from agents.infra.run import detached_run
from agents.lower.sac import SACTrainer
from tests.test_async_envs import STACK, fake_args
from wrappers.atari import GameStatistics

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTH = 12


class GrowingGames(gym.Env):
    """Games of 4 steps until the env's 120th step, of 40 steps after."""

    observation_space = gym.spaces.Box(0, 255, (10, 10), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def __init__(self):
        self.steps = self.in_game = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.in_game = 0
        return self._frame(), {}

    def step(self, action):
        self.steps += 1
        self.in_game += 1
        game_length = 4 if self.steps < 120 else 40
        return self._frame(), 1.0, self.in_game >= game_length, False, {}

    def _frame(self):
        return np.full((10, 10), self.steps % 250 + 1, np.uint8)  # the env's step counter, never 0 (padding)


def growing_trainer(monkeypatch, **changes) -> SACTrainer:
    def make_envs(self, seed):
        fns = [lambda: gym.wrappers.FrameStackObservation(GrowingGames(), STACK, padding_type="zero")]
        envs = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
        return GameStatistics(envs, seed=seed, frame_stack=STACK)

    monkeypatch.setattr(SACTrainer, "_make_envs", make_envs)
    args = fake_args(1, graph_ready=False, learning_starts=1000, buffer_size=1000, **changes)
    return SACTrainer(args, torch.device("cpu"), detached_run(args))


def test_short_first_games_are_played_past_until_one_holds_a_fragment(monkeypatch):
    trainer = growing_trainer(monkeypatch, total_timesteps=1000)
    fragments = trainer.recent_fragments(6, LENGTH, 2 * LENGTH, torch.Generator().manual_seed(0))
    assert 120 <= trainer.global_step <= 4 * 120  # it doubled the stored steps until a long game fit
    assert fragments.frames.shape[:2] == (6, STACK - 1 + LENGTH)  # the first step's stack, then one frame a step
    counter = fragments.frames[:, STACK - 1 :, 0, 0].long()  # each step's newest frame
    assert (counter > 0).all() and ((counter[:, 1:] - counter[:, :-1]) % 250 == 1).all()  # one game, no reset inside


def test_a_window_holding_a_fragment_takes_no_extra_step(monkeypatch):
    trainer = growing_trainer(monkeypatch, total_timesteps=1000)
    trainer.collect(300)
    before = trainer.global_step
    trainer.recent_fragments(6, LENGTH, 2 * LENGTH, torch.Generator().manual_seed(0))
    assert trainer.global_step == before


def test_the_budget_still_bounds_the_search(monkeypatch):
    trainer = growing_trainer(monkeypatch, total_timesteps=100)
    with pytest.raises(UsageError, match="--fragment-length 12: no 12-step stretch"):
        trainer.recent_fragments(6, LENGTH, 2 * LENGTH, torch.Generator().manual_seed(0))
    assert trainer.global_step == 100
