"""The learned reward r_phi(s, .): the Christiano et al. (2017) Atari reward CNN used by SoBiRL (Appendix I).

Four convolutions of 16 filters (kernels 7/5/3/3, strides 3/2/1/1), each followed by BatchNorm, LeakyReLU(0.01) and
Dropout(0.5); then Linear(784, 64), LeakyReLU(0.01) and one output per action. About 65k parameters.

The per-action head is what the SoBiRL implicit term needs: it evaluates sum_a pi(a|s) r(s, a) from the same forward
pass that gives r(s, a_t).

Training mode is the hot path of every reward update (3,200 observations per 64-pair minibatch), so it avoids
memory traffic the plain module stack would spend: the 1/255 pixel scaling is folded into the first convolution's
weights, and LeakyReLU + Dropout are one autograd node that keeps a single tensor for backward. On CPU the dropout
mask comes from random bits (p = 0.5 is one fair bit per unit), several times cheaper than `bernoulli_`. The
function computed is the textbook one; `reference_forward` spells it out with stock modules for the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride) of the four convolutions, from Appendix I.
CONV_LAYERS = ((7, 3), (5, 2), (3, 1), (3, 1))
FILTERS = 16
HIDDEN = 64
NEGATIVE_SLOPE = 0.01
DROPOUT = 0.5


def conv_output_sizes(size: int) -> list[int]:
    """Spatial size after each convolution (84 -> 26 -> 11 -> 9 -> 7)."""
    sizes = []
    for kernel, stride in CONV_LAYERS:
        size = (size - kernel) // stride + 1
        sizes.append(size)
    return sizes


def random_bits(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent fair coin flips, a bool tensor shaped and strided like `like` (which must be dense).

    Each bit of a uniform int32 word is one flip. Matching the strides keeps the later masked_fill_ a linear scan.
    """
    count, device = like.numel(), like.device
    words = torch.randint(-(2**31), 2**31, ((count + 31) // 32,), dtype=torch.int32, device=device, generator=generator)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    bits = (words.view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return bits.view(torch.bool).flatten()[:count].as_strided(like.shape, like.stride())


def dropout_drop_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """True where a unit of `like` is dropped, each with probability p."""
    if p == 0.5 and like.device.type == "cpu":
        return random_bits(like)
    return torch.rand_like(like) < p


class _LeakyReLUDropout_(torch.autograd.Function):
    """In place: z <- drop ? 0 : leaky_relu(z). The caller has already multiplied z by 1 / (1 - p).

    The local derivative is 1 where the output is positive, slope where it is negative and 0 where the unit was
    dropped, so the output alone determines it. The output is what the next convolution keeps for its own backward,
    so this node adds no saved tensor of its own.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, slope: float, p: float) -> torch.Tensor:
        F.leaky_relu_(z, slope)
        z.masked_fill_(dropout_drop_mask(z, p), 0.0)
        ctx.mark_dirty(z)
        ctx.save_for_backward(z)
        ctx.slope = slope
        return z

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (out,) = ctx.saved_tensors
        grad = torch.ops.aten.leaky_relu_backward(grad_out, out, ctx.slope, True)
        return grad.masked_fill_(out == 0, 0.0), None, None


def norm_act_dropout(x: torch.Tensor, norm: nn.BatchNorm2d, slope: float, p: float, training: bool) -> torch.Tensor:
    """dropout(leaky_relu(batch_norm(x))) with the same running-statistics updates as `norm(x)`.

    leaky_relu is positively homogeneous, so the inverted-dropout factor 1 / (1 - p) moves into BatchNorm's affine
    parameters, which spares a pass over the activations.
    """
    if not training:
        return F.leaky_relu(norm(x), slope)
    if p >= 1.0:
        return torch.zeros_like(x)
    scale = 1.0 / (1.0 - p)
    if norm.track_running_stats:
        norm.num_batches_tracked.add_(1)
    z = F.batch_norm(
        x, norm.running_mean, norm.running_var, norm.weight * scale, norm.bias * scale,
        training=True, momentum=norm.momentum, eps=norm.eps,
    )
    if p == 0.0:
        return F.leaky_relu(z, slope)
    return _LeakyReLUDropout_.apply(z, slope, p)


class RewardCNN(nn.Module):
    """r_phi(s, .) for (B, C, 84, 84) uint8 observations; forward returns (B, num_actions) float rewards.

    Call `.eval()` before producing rewards for the policy learner (no dropout, running BatchNorm statistics) and
    `.train()` only around the reward model's own updates.
    """

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, dropout: float = DROPOUT):
        super().__init__()
        if len(obs_shape) != 3:
            raise ValueError(f"RewardCNN needs (channels, height, width) observations, got shape {tuple(obs_shape)}")
        channels, height, width = obs_shape
        sizes_h, sizes_w = conv_output_sizes(height), conv_output_sizes(width)
        if min(sizes_h + sizes_w) < 1:
            raise ValueError(
                f"RewardCNN is the paper's 84x84 Atari architecture; observations of {height}x{width} are too small "
                "for its kernels 7/5/3/3 with strides 3/2/1/1"
            )
        self.obs_shape = tuple(obs_shape)
        self.num_actions = num_actions
        self.dropout = dropout
        in_channels = [channels] + [FILTERS] * (len(CONV_LAYERS) - 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, FILTERS, kernel, stride=stride) for c, (kernel, stride) in zip(in_channels, CONV_LAYERS)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(FILTERS) for _ in CONV_LAYERS)
        self.features = FILTERS * sizes_h[-1] * sizes_w[-1]
        self.fc = nn.Linear(self.features, HIDDEN)
        self.head = nn.Linear(HIDDEN, num_actions)
        self.memory_format = torch.channels_last

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.to(torch.float32, memory_format=self.memory_format)
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            # Scaling the first kernel instead of the 3,200 x 4 x 84 x 84 input saves a full pass over the batch.
            weight = conv.weight / 255.0 if index == 0 else conv.weight
            x = F.conv2d(x, weight, conv.bias, conv.stride)
            x = norm_act_dropout(x, norm, NEGATIVE_SLOPE, self.dropout, self.training)
        x = F.leaky_relu(self.fc(x.flatten(1)), NEGATIVE_SLOPE)
        return self.head(x)

    def reference_forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The same function with stock modules (obs / 255, Conv, BN, LeakyReLU, Dropout); for tests."""
        x = obs.float() / 255.0
        for conv, norm in zip(self.convs, self.norms):
            x = F.dropout(F.leaky_relu(norm(conv(x)), NEGATIVE_SLOPE), self.dropout, self.training)
        return self.head(F.leaky_relu(self.fc(x.flatten(1)), NEGATIVE_SLOPE))

    def taken(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """r_phi(s, a) for (B,) actions."""
        return self(obs).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
