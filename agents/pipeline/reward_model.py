"""The learned reward r_phi(s, .): the Christiano et al. (2017) Atari reward CNN used by SoBiRL (Appendix I).

Four convolutions of 16 filters (kernels 7/5/3/3, strides 3/2/1/1), each followed by BatchNorm, LeakyReLU(0.01) and
Dropout(0.5); then Linear(784, 64), LeakyReLU(0.01) and one output per action. About 65k parameters.

The per-action head is what the SoBiRL implicit term needs: it evaluates sum_a pi(a|s) r(s, a) from the same forward
pass that gives r(s, a_t).

`forward` is the textbook network written with stock modules; it is what runs on CUDA, in evaluation mode, and
under --compile. One boundary sets the CPU apart: in training mode on a CPU, the hot path of every reward update
(3,200 observations per 64-pair minibatch) goes through `cpu_training_forward`, the same function computed with
less memory traffic, because the stock modules missed the reward update's time and memory target on the 2-core
development machine (the figures: docs/performance.md, "Atari figures"; `python sobirl/bench.py` measures them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agents.infra.checkpoint import load_checkpoint
from agents.infra.cli import UsageError
from agents.pipeline.ensemble import RewardEnsemble

# (kernel, stride) of the four convolutions, from Appendix I.
CONV_LAYERS = ((7, 3), (5, 2), (3, 1), (3, 1))
# Small boards (MinAtar's 10x10) get two 3x3 stride-1 convolutions of the same design; Atari keeps the paper's.
SMALL_CONV_LAYERS = ((3, 1), (3, 1))
SMALL_INPUT = 36
FILTERS = 16
HIDDEN = 64
NEGATIVE_SLOPE = 0.01
DROPOUT = 0.5
PIXEL_SCALE = 1.0 / 255.0


def conv_layers_for(height: int, width: int) -> tuple[tuple[int, int], ...]:
    return CONV_LAYERS if min(height, width) >= SMALL_INPUT else SMALL_CONV_LAYERS


def conv_output_sizes(size: int, layers: tuple[tuple[int, int], ...] = CONV_LAYERS) -> list[int]:
    """Spatial size after each convolution (84 -> 26 -> 11 -> 9 -> 7 for the paper's layers)."""
    sizes = []
    for kernel, stride in layers:
        size = (size - kernel) // stride + 1
        sizes.append(size)
    return sizes


def random_bits(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent fair coin flips as int32 words that are all zeros or all ones (0 or -1), shaped and strided like
    the dense tensor `like`.

    Every bit of a uniform int32 word is one flip: shifting bit k into the sign position and back spreads it over
    the whole word. Whole-word masks let dropout zero float units with one in-place bitwise AND on their bit
    patterns; a float multiply by a bool or uint8 mask would first convert the mask to float.
    """
    count, device = like.numel(), like.device
    words = torch.randint(
        -(2**31), 2**31, ((count + 31) // 32, 1), dtype=torch.int32, device=device, generator=generator
    )
    to_sign = 31 - torch.arange(32, dtype=torch.int32, device=device)
    bits = (words << to_sign).__irshift__(31)
    return bits.flatten()[:count].as_strided(like.shape, like.stride())


def drop_units_(z: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each unit of z with probability p, in place."""
    if p == 0.5 and z.device.type == "cpu" and z.dtype.itemsize == 4:
        z.view(torch.int32).bitwise_and_(random_bits(z))
    else:
        z.mul_(torch.rand_like(z) >= p)
    return z


class _LeakyReLUDropoutInplace(torch.autograd.Function):
    """z <- keep * leaky_relu(z), in place; the caller has already scaled z by 1 / (1 - p).

    The local derivative is 1 where the output is positive, slope where it is negative and 0 where the unit was
    dropped, so the output alone determines it: it is leaky_relu(sign(out), -slope).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, slope: float, p: float) -> torch.Tensor:
        drop_units_(F.leaky_relu_(z, slope), p)
        ctx.mark_dirty(z)
        ctx.save_for_backward(z)
        ctx.slope = slope
        return z

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (out,) = ctx.saved_tensors
        # All-float arithmetic: multiplying by a uint8 or bool mask makes PyTorch convert the mask first (slow).
        local = F.leaky_relu_(torch.sign(out), -ctx.slope)
        return local.mul_(grad_out), None, None


def norm_act_dropout(x: torch.Tensor, norm: nn.BatchNorm2d, slope: float, p: float, training: bool) -> torch.Tensor:
    """dropout(leaky_relu(batch_norm(x))), with the same running-statistics updates as `norm(x)`."""
    if not training or p == 0.0:
        return F.leaky_relu(norm(x), slope)
    if p >= 1.0:
        return torch.zeros_like(x)
    scale = 1.0 / (1.0 - p)
    if norm.track_running_stats:
        norm.num_batches_tracked.add_(1)
    z = F.batch_norm(
        x,
        norm.running_mean,
        norm.running_var,
        norm.weight * scale,
        norm.bias * scale,
        training=True,
        momentum=norm.momentum,
        eps=norm.eps,
    )
    return _LeakyReLUDropoutInplace.apply(z, slope, p)


def pixels_to_float(obs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return obs.to(dtype, memory_format=torch.channels_last)


class _ConvFromPixels(torch.autograd.Function):
    """conv2d(float(obs), weight, bias) for uint8 obs, saving obs rather than its float copy for backward."""

    @staticmethod
    def forward(ctx, obs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: tuple[int, int]):
        ctx.save_for_backward(obs, weight)
        ctx.stride = stride
        return F.conv2d(pixels_to_float(obs, weight.dtype), weight, bias, stride)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        obs, weight = ctx.saved_tensors
        _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out,
            pixels_to_float(obs, weight.dtype),
            weight,
            [weight.shape[0]],
            list(ctx.stride),
            [0, 0],
            [1, 1],
            False,
            [0, 0],
            1,
            [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
        )
        return None, grad_weight, grad_bias, None


class RewardCNN(nn.Module):
    """r_phi(s, .) for (B, C, 84, 84) uint8 observations (or small boards, with two 3x3 convolutions); forward
    returns (B, num_actions) float rewards.

    Call `.eval()` before producing rewards for the policy learner (no dropout, running BatchNorm statistics) and
    `.train()` only around the reward model's own updates.
    """

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, dropout: float = DROPOUT):
        super().__init__()
        if len(obs_shape) != 3:
            raise ValueError(f"RewardCNN needs (channels, height, width) observations, got shape {tuple(obs_shape)}")
        channels, height, width = obs_shape
        layers = conv_layers_for(height, width)
        sizes_h, sizes_w = conv_output_sizes(height, layers), conv_output_sizes(width, layers)
        if min(sizes_h + sizes_w) < 1:
            raise ValueError(f"observations of {height}x{width} are too small for the reward CNN's 3x3 kernels")
        self.obs_shape = tuple(obs_shape)
        self.num_actions = num_actions
        self.dropout = dropout
        in_channels = [channels] + [FILTERS] * (len(layers) - 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, FILTERS, kernel, stride=stride) for c, (kernel, stride) in zip(in_channels, layers)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(FILTERS) for _ in layers)
        self.features = FILTERS * sizes_h[-1] * sizes_w[-1]
        self.fc = nn.Linear(self.features, HIDDEN)
        self.head = nn.Linear(HIDDEN, num_actions)
        self.cpu_kernels = True  # False: the stock modules everywhere (--compile sets it, tests compare the two)
        # Training-mode BatchNorm statistics over groups of this many consecutive observations (0: the whole batch).
        # The authors' code ran each 25-step fragment through the net on its own (--per-fragment-batchnorm).
        self.batchnorm_group = 0

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.training and obs.device.type == "cpu" and self.cpu_kernels and not self.batchnorm_group:
            return self.cpu_training_forward(obs)
        return self.stock_forward(obs)

    def stock_forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs / 255 -> [Conv -> BatchNorm -> LeakyReLU -> Dropout] x 4 -> Linear -> LeakyReLU -> Linear."""
        x = obs.to(self.head.weight.dtype) / 255.0
        for conv, norm in zip(self.convs, self.norms):
            x = F.dropout(F.leaky_relu(self._normalise(norm, conv(x)), NEGATIVE_SLOPE), self.dropout, self.training)
        return self.head(F.leaky_relu(self.fc(x.flatten(1)), NEGATIVE_SLOPE))

    def _normalise(self, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        group = self.batchnorm_group
        if not (self.training and group and x.shape[0] % group == 0):
            return norm(x)
        # Ghost batch norm: each group of `group` observations is normalised with its own statistics, as if run
        # through the net alone; the running statistics follow the groups' mean statistics.
        g = x.reshape(x.shape[0] // group, group, *x.shape[1:])  # (groups, group, C, h, w)
        dims = (1, 3, 4)
        mean, var = g.mean(dims, keepdim=True), g.var(dims, unbiased=False, keepdim=True)
        shape = (1, 1, -1, 1, 1)
        out = (g - mean) * torch.rsqrt(var + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)
        with torch.no_grad():
            count = group * x.shape[2] * x.shape[3]
            norm.num_batches_tracked.add_(1)
            norm.running_mean.lerp_(mean.mean((0, 1, 3, 4)), norm.momentum)
            norm.running_var.lerp_(var.mean((0, 1, 3, 4)) * count / (count - 1), norm.momentum)
        return out.reshape(x.shape)

    reference_forward = stock_forward

    def cpu_training_forward(self, obs: torch.Tensor) -> torch.Tensor:
        """`stock_forward` in training mode, computed with less memory traffic on CPU:

        - activations are channels-last, where oneDNN's convolution backward is several times faster on CPU;
        - the 1/255 pixel scaling is folded into the first kernel, and the first convolution keeps its uint8 input
          for backward instead of a float copy four times larger;
        - inverted dropout's factor 1/(1-p) is folded into BatchNorm's affine parameters (LeakyReLU is positively
          homogeneous), and LeakyReLU + Dropout run in place as one autograd node whose saved tensor is its own
          output, which the next convolution keeps anyway;
        - on CPU, p = 0.5 dropout masks are random bits, one per unit, several times cheaper than `bernoulli_`.
        """
        first = self.convs[0]
        weight = first.weight * PIXEL_SCALE
        if torch.is_grad_enabled() and (weight.requires_grad or first.bias.requires_grad):
            x = _ConvFromPixels.apply(obs, weight, first.bias, first.stride)
        else:
            x = F.conv2d(pixels_to_float(obs, weight.dtype), weight, first.bias, first.stride)
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if index > 0:
                x = conv(x)
            x = norm_act_dropout(x, norm, NEGATIVE_SLOPE, self.dropout, self.training)
        x = F.leaky_relu(self.fc(x.flatten(1)), NEGATIVE_SLOPE)
        return self.head(x)


def load_frozen_reward(
    path: str, env_id: str, obs_shape: tuple[int, ...], num_actions: int, device: torch.device | str
) -> nn.Module:
    """The final reward model of a finished (or stopped) preference run, in evaluation mode: a RewardCNN, or the
    mean of an ensemble's members, as that run's policy learned from it. Errors name --frozen-reward."""
    state = load_checkpoint(path, device, flag="--frozen-reward")
    run_args, algorithm = state.get("args") or {}, state.get("algorithm") or {}
    if "reward_net" not in algorithm:
        raise UsageError(f"--frozen-reward {path}: a {state.get('algo')!r} run has no reward model")
    if run_args.get("env_id") != env_id:
        raise UsageError(
            f"--frozen-reward {path}: the run learned its reward on {run_args.get('env_id')}, not {env_id}"
        )
    members = [RewardCNN(obs_shape, num_actions) for _ in range(int(run_args.get("ensemble", 1)))]
    net = members[0] if len(members) == 1 else RewardEnsemble(members)
    try:
        net.load_state_dict(algorithm["reward_net"])
    except RuntimeError as err:
        raise UsageError(
            f"--frozen-reward {path}: its reward model does not fit this run ({err})".split("\n")[0]
        ) from None
    return net.to(device).eval()
