"""Evaluation of a policy on its own environments: whole games, true (unclipped) scores."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def play_games(envs, actor: torch.nn.Module, device: torch.device, greedy: bool) -> list[float]:
    """The true score of the first game of each sub-env of `envs` (one game per sub-env, so long games are not
    under-represented the way they are when the first N finished games are counted)."""
    obs, _ = envs.reset()
    scores: list[float | None] = [None] * envs.num_envs
    while any(score is None for score in scores):
        logits = actor(torch.as_tensor(obs, device=device))
        actions = logits.argmax(-1) if greedy else torch.distributions.Categorical(logits=logits).sample()
        obs, _, _, _, info = envs.step(actions.cpu().numpy())
        if "_episode" in info:
            for env in np.nonzero(info["_episode"])[0]:
                if scores[env] is None:
                    scores[env] = float(info["episode"]["r"][env])
    return scores
