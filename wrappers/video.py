"""Videos of the current policy on a separate single environment (ale-py's vector env cannot render).

gymnasium's RecordVideo writes mp4 files through moviepy and its AtariPreprocessing resizes frames with OpenCV:
`pip install -e ".[video]"` installs both.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch


def make_render_env(env_id: str, video_dir: str, max_episode_frames: int = 108_000) -> gym.Env:
    """One env with the training preprocessing (no life-loss terminals: a video shows a whole game) that records
    every episode to `video_dir`."""
    import ale_py

    gym.register_envs(ale_py)
    env = gym.make(env_id, render_mode="rgb_array", max_num_frames_per_episode=max_episode_frames)
    env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, terminal_on_life_loss=False)
    return gym.wrappers.FrameStackObservation(env, 4, padding_type="zero")


@torch.no_grad()
def record_greedy_episode(
    env_id: str,
    actor: torch.nn.Module,
    device: torch.device,
    video_dir: str,
    seed: int,
    max_episode_frames: int = 108_000,
) -> float:
    """Play one game with the most probable action and save its video; returns the game score."""
    env = make_render_env(env_id, video_dir, max_episode_frames)
    obs, _ = env.reset(seed=seed)
    score, done = 0.0, False
    while not done:
        logits = actor(torch.as_tensor(np.asarray(obs)[None], device=device))
        obs, reward, terminated, truncated, _ = env.step(int(logits.argmax(-1)))
        score += float(reward)
        done = terminated or truncated
    env.close()
    return score
