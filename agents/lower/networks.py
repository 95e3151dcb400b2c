"""Actor and critic networks of SAC-discrete: separate encoders (no sharing), as in the paper's code.

Observations arrive as uint8 (B, *obs_shape) and are scaled to [0, 1] inside the networks, so replay storage and
environment outputs stay compact. 84x84 inputs get the Nature-DQN CNN the paper uses; small inputs (MinAtar's
10x10 boards) get a one-conv network sized from the observation shape.
"""

from __future__ import annotations

import torch
from torch import nn


def nature_cnn(in_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 8, stride=4),
        nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1),
        nn.Flatten(),
    )


def small_cnn(in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=1), nn.ReLU(), nn.Flatten())


def encoder_for(obs_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """The encoder for (C, H, W) observations and its output width."""
    if len(obs_shape) != 3:
        raise ValueError(f"observation shape {obs_shape} is not (channels, height, width)")
    channels, height, width = obs_shape
    if min(height, width) >= 36:
        encoder = nature_cnn(channels)
    elif min(height, width) >= 3:
        encoder = small_cnn(channels)
    else:
        raise ValueError(f"observation shape {obs_shape} is too small for a convolutional network")
    with torch.no_grad():
        width_out = encoder(torch.zeros(1, *obs_shape)).shape[1]
    return encoder, width_out


class DiscreteHead(nn.Module):
    """Encoder -> Linear(hidden) -> ReLU -> Linear(num_actions): logits for the actor, Q-values for a critic."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, hidden: int | None = None):
        super().__init__()
        self.encoder, features = encoder_for(obs_shape)
        hidden = hidden or (512 if features >= 3136 else 128)
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_actions))
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

        self.channels_last = False

    def use_fastest_layout(self) -> DiscreteHead:
        """NHWC activations for the Nature CNN, where oneDNN's convolution backward is faster on CPU; small boards
        stay NCHW, where NHWC costs layout copies and slower kernels (figures: docs/performance.md)."""
        self.channels_last = isinstance(self.encoder[0], nn.Conv2d) and self.encoder[0].kernel_size[0] == 8
        return self.to(memory_format=torch.channels_last) if self.channels_last else self

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.encoder(x))


class Actor(DiscreteHead):
    """Categorical policy; `forward` returns logits."""

    def probs(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action probabilities and their logs, (B, A) each."""
        log_probs = torch.log_softmax(self(obs), dim=-1)
        return log_probs.exp(), log_probs


class SoftQNetwork(DiscreteHead):
    """Q(s, .) for every action."""
