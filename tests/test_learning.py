"""An agent learns (in the spirit of stable-baselines3's identity tests): SAC-discrete on MinAtar Breakout's true
reward, 12k env steps with a fixed seed, plays clearly better than the uniform random policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from agents.lower.evaluation import play_games
from agents.lower.sac import Args, SACTrainer
from wrappers import make_envs

pytestmark = pytest.mark.usefixtures("single_thread")


class UniformPolicy(nn.Module):
    def __init__(self, num_actions: int):
        super().__init__()
        self.num_actions = num_actions

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0], self.num_actions)


def mean_score(actor: nn.Module, games: int = 32) -> float:
    torch.manual_seed(0)  # the sampled actions: the same draws for every policy and every run
    envs = make_envs("MinAtar/Breakout-v1", games, seed=12345)  # games the agent never trained on
    scores = play_games(envs, actor, torch.device("cpu"), greedy=False)
    envs.close()
    return float(np.mean(scores))


def test_sac_learns_minatar_breakout():
    pytest.importorskip("minatar")
    torch.manual_seed(1)
    args = Args(
        env_id="MinAtar/Breakout-v1",
        total_timesteps=12_000,
        learning_starts=1_000,
        buffer_size=20_000,
        target_network_frequency=1_000,
        max_episode_frames=2_000,
        progress=False,
        cuda=False,
    )
    trainer = SACTrainer(args, torch.device("cpu"))
    trainer.train()
    random_score = mean_score(UniformPolicy(trainer.num_actions))
    learned_score = mean_score(trainer.agent.actor)
    trainer.close()
    # Random play averages 0.4 per game on MinAtar Breakout (100k steps of it in the README's benchmark).
    assert random_score < 0.5, random_score
    # Measured with this seed: random 0.28, SAC 0.78 (32 games with sampled actions).
    assert learned_score > 0.6 and learned_score > 2 * random_score, (learned_score, random_score)
