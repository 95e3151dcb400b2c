"""Preference-based reward learning shared by DRLHF and SoBiRL: fragments, synthetic teachers, the pair schedule,
the pair buffer, reward-model epochs and preference accuracy.

A fragment is stored as `frames`, uint8 (H + stack - 1, *frame_shape): the observation at step h is
frames[h : h + stack] (frames[h] when stack == 1), so a 25-step Atari fragment costs 28 frames instead of 100.
Ground-truth rewards reach the reward learner only through the teachers' labels; the returns kept next to each
pair serve the accuracy metrics alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from agents.sobirl import LOGIT_CLAMP, fragment_returns, sobirl_loss_terms

PolicyProbs = Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, *obs_shape) -> (N, A) action probabilities

# ---------------------------------------------------------------------------------------------------------------
# Fragments


def stack_windows(frames: torch.Tensor, stack: int, frame_ndim: int = 2) -> torch.Tensor:
    """(..., H + stack - 1, *frame_shape) frames -> (..., H, stack, *frame_shape) observations, as a view.

    `frame_ndim` is len(frame_shape) (2 for image frames). With stack == 1 the frames already are the observations.
    """
    if stack == 1:
        return frames
    time_dim = frames.dim() - frame_ndim - 1
    windows = frames.unfold(time_dim, stack, 1)  # (..., H, *frame_shape, stack)
    return windows.movedim(-1, time_dim + 1)


def fragment_observations(frames: torch.Tensor, length: int) -> torch.Tensor:
    """(N, length + stack - 1, *frame_shape) fragments -> dense (N * length, *obs_shape) observations.

    The stack is implied by the shapes: a fragment of `length` steps keeps stack - 1 frames of history. Stacks of
    image frames come out channels-last (the stack is the innermost axis in memory): gathering them that way is
    what `unfold` gives for free, and it is the layout the CNNs run fastest in on CPU.
    """
    stack = frames.shape[1] - length + 1
    if stack < 1:
        raise ValueError(f"fragments of {frames.shape[1]} frames cannot hold {length} steps")
    count = frames.shape[0] * length
    if stack > 1 and frames.dim() == 4:
        windows = frames.unfold(1, stack, 1)  # (N, length, height, width, stack)
        return windows.reshape(count, *windows.shape[2:]).permute(0, 3, 1, 2)
    obs = stack_windows(frames, stack, frame_ndim=frames.dim() - 2)
    return obs.reshape(count, *obs.shape[2:])


# ---------------------------------------------------------------------------------------------------------------
# Synthetic teachers: label y = P(fragment 1 preferred) from the fragments' sums of clipped ground-truth rewards.


def oracle_labels(returns1: torch.Tensor, returns2: torch.Tensor) -> torch.Tensor:
    """The paper's text: the higher return is preferred (y = 1 or 0); equal returns give y = 0.5."""
    return 0.5 * (torch.sign(returns1 - returns2) + 1.0).float()


def bernoulli_labels(
    returns1: torch.Tensor, returns2: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The authors' code: y ~ Bernoulli(sigmoid(R1 - R2)), a Bradley-Terry-rational teacher at temperature 1."""
    p = torch.sigmoid(torch.clamp(returns1 - returns2, -LOGIT_CLAMP, LOGIT_CLAMP).float())
    if generator is not None and generator.device != p.device:
        return torch.bernoulli(p.cpu(), generator=generator).to(p.device)
    return torch.bernoulli(p, generator=generator)


TEACHERS = ("oracle", "bernoulli")


def label_pairs(
    teacher: str, returns1: torch.Tensor, returns2: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    if teacher == "oracle":
        return oracle_labels(returns1, returns2)
    if teacher == "bernoulli":
        return bernoulli_labels(returns1, returns2, generator)
    raise ValueError(f"unknown teacher {teacher!r}; expected one of {', '.join(TEACHERS)}")


# ---------------------------------------------------------------------------------------------------------------
# Query schedule


def round_preserving_sum(x: np.ndarray) -> np.ndarray:
    """Integers that sum to round(sum(x)) and are each within 1 of x: floor everything, then add one to the entries
    with the largest fractional parts (this minimises every Lp distance to x; it is imitation's rounding)."""
    floors = np.floor(x)
    fractions = x - floors
    missing = int(round(fractions.sum()))
    order = np.argsort(-fractions, kind="stable")
    floors[order[:missing]] += 1
    return floors.astype(np.int64)


def pairs_schedule(initial_pairs: int, total_pairs: int, schedule_iterations: int) -> list[int]:
    """New pairs to query at each outer iteration: [initial_pairs, n_1, ..., n_{schedule_iterations}].

    The remaining total_pairs - initial_pairs are spread over the iterations proportionally to the "hyperbolic"
    schedule 1 / (1 + t), t = linspace(0, 1, schedule_iterations), then rounded to integers that keep the total.
    With the paper's 600 / 9000 / 2000 this gives [600, 6 x 212, 5, ...] and 2,967 pairs by iteration 431.
    """
    if schedule_iterations <= 0:
        return [initial_pairs]
    weights = 1.0 / (1.0 + np.linspace(0.0, 1.0, schedule_iterations))
    shares = weights / weights.sum() * (total_pairs - initial_pairs)
    return [initial_pairs] + round_preserving_sum(shares).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Pair buffer


@dataclass
class PairBatch:
    frames1: torch.Tensor  # uint8 (B, H + stack - 1, *frame_shape)
    actions1: torch.Tensor  # int64 (B, H)
    frames2: torch.Tensor
    actions2: torch.Tensor
    labels: torch.Tensor  # float32 (B,), P(fragment 1 preferred) given by the teacher
    returns1: torch.Tensor  # float32 (B,), ground-truth fragment returns, for accuracy metrics only
    returns2: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


class PairBuffer:
    """FIFO of labelled fragment pairs: once `capacity` pairs are stored, each new pair replaces the oldest."""

    def __init__(
        self, capacity: int, fragment_length: int, frame_shape: tuple[int, ...], stack: int, device: torch.device | str
    ):
        if capacity < 1:
            raise ValueError(f"pair buffer capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.fragment_length = fragment_length
        self.device = torch.device(device)
        frames_shape = (capacity, fragment_length + stack - 1, *frame_shape)
        # torch.empty does not touch the pages, so an unfilled buffer costs no memory.
        self.frames1 = torch.empty(frames_shape, dtype=torch.uint8, device=self.device)
        self.frames2 = torch.empty(frames_shape, dtype=torch.uint8, device=self.device)
        self.actions1 = torch.empty((capacity, fragment_length), dtype=torch.int64, device=self.device)
        self.actions2 = torch.empty_like(self.actions1)
        self.labels = torch.empty(capacity, dtype=torch.float32, device=self.device)
        self.returns1 = torch.empty_like(self.labels)
        self.returns2 = torch.empty_like(self.labels)
        self.pos = 0  # next row to write
        self.size = 0
        self.total_added = 0

    def __len__(self) -> int:
        return self.size

    def add(self, pairs: PairBatch) -> None:
        n = len(pairs)
        if n > self.capacity:  # only the newest `capacity` pairs would survive anyway
            pairs = self._slice(pairs, slice(n - self.capacity, n))
            self.total_added += n - self.capacity
            n = self.capacity
        rows = (self.pos + torch.arange(n)) % self.capacity
        rows = rows.to(self.device)
        for name in ("frames1", "actions1", "frames2", "actions2", "labels", "returns1", "returns2"):
            getattr(self, name)[rows] = getattr(pairs, name).to(self.device, getattr(self, name).dtype)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.total_added += n

    def get(self, index: torch.Tensor) -> PairBatch:
        index = index.to(self.device)
        return PairBatch(
            self.frames1[index], self.actions1[index], self.frames2[index], self.actions2[index],
            self.labels[index], self.returns1[index], self.returns2[index],
        )

    def oldest_first(self) -> torch.Tensor:
        """Row indices of the stored pairs from oldest to newest."""
        start = self.pos if self.size == self.capacity else 0
        return (start + torch.arange(self.size)) % self.capacity

    @staticmethod
    def _slice(pairs: PairBatch, part: slice) -> PairBatch:
        return PairBatch(*(getattr(pairs, name)[part] for name in PairBatch.__dataclass_fields__))


# ---------------------------------------------------------------------------------------------------------------
# Reward-model updates


def probs_in_chunks(policy_probs: PolicyProbs, obs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Policy probabilities for (N, *obs_shape) observations, `chunk` at a time so activations stay small."""
    with torch.no_grad():
        return torch.cat([policy_probs(part) for part in obs.split(chunk)])


def pair_rewards(
    reward_net: torch.nn.Module, frames1: torch.Tensor, frames2: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-action rewards (B, H, A) of both fragments from ONE forward pass, plus the (2 B H, *obs_shape) inputs.

    One pass matters beyond speed: in training mode BatchNorm normalises over both fragments of every pair together.
    """
    obs = fragment_observations(torch.cat([frames1, frames2]), length)
    rewards = reward_net(obs).view(2, frames1.shape[0], length, -1)
    return rewards[0], rewards[1], obs


def reward_update(
    reward_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pairs: PairBatch,
    inv_alpha: float,
    policy_probs: PolicyProbs | None = None,
    weight: float = 1.0,
    policy_chunk: int = 1600,
) -> dict[str, float]:
    """One optimizer step on `pairs` with the SoBiRL loss (the BCE alone when inv_alpha == 0), scaled by `weight`.

    The policy is evaluated only when the implicit term is on. Returns the step's loss, bce, hyper_term and the
    train-mode accuracy against the oracle (nan when every pair is a ground-truth tie).
    """
    batch, length = pairs.actions1.shape
    obs = fragment_observations(torch.cat([pairs.frames1, pairs.frames2]), length)
    pi1 = pi2 = None
    if inv_alpha != 0:
        # Before the reward forward pass: the policy's activations are freed before the reward model's, which
        # autograd keeps until backward, are allocated, so the two never add up in peak memory.
        probs = probs_in_chunks(policy_probs, obs, policy_chunk).float().view(2, batch, length, -1)
        pi1, pi2 = probs[0], probs[1]
    rewards = reward_net(obs).view(2, batch, length, -1)
    del obs
    r1, r2 = rewards[0], rewards[1]
    loss, bce, hyper = sobirl_loss_terms(r1, pairs.actions1, pi1, r2, pairs.actions2, pi2, pairs.labels, inv_alpha)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    optimizer.step()
    with torch.no_grad():
        correct, counted = oracle_agreement(
            fragment_returns(r1, pairs.actions1), fragment_returns(r2, pairs.actions2), pairs.returns1, pairs.returns2
        )
    return {"loss": loss.item(), "bce": bce.item(), "hyper_term": hyper.item(), "correct": correct, "counted": counted}


def reward_epoch(
    reward_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    buffer: PairBuffer,
    batch_size: int,
    inv_alpha: float = 0.0,
    policy_probs: PolicyProbs | None = None,
    generator: torch.Generator | None = None,
    policy_chunk: int = 1600,
) -> dict[str, float]:
    """One pass over the pair buffer in shuffled minibatches of `batch_size`, the net in training mode throughout.

    As in imitation's trainer (which the reference uses), the last, partial minibatch still takes a step, with its
    loss scaled by len / batch_size. The net is left in evaluation mode, ready to produce rewards for SAC.
    Returns pair-weighted means of loss, bce and hyper_term, the train-mode accuracy and the number of steps.
    """
    if inv_alpha != 0 and policy_probs is None:
        raise ValueError("the implicit term (inv_alpha != 0) needs policy_probs")
    reward_net.train()
    order = torch.randperm(len(buffer), generator=generator)
    rows = buffer.oldest_first()
    totals = {"loss": 0.0, "bce": 0.0, "hyper_term": 0.0, "correct": 0.0, "counted": 0.0}
    try:
        for part in order.split(batch_size):
            pairs = buffer.get(rows[part])
            step = reward_update(
                reward_net, optimizer, pairs, inv_alpha, policy_probs, len(part) / batch_size, policy_chunk
            )
            for key in ("loss", "bce", "hyper_term"):
                totals[key] += step[key] * len(part)
            totals["correct"] += step["correct"]
            totals["counted"] += step["counted"]
    finally:
        reward_net.eval()
    n = max(len(buffer), 1)
    return {
        "loss": totals["loss"] / n,
        "bce": totals["bce"] / n,
        "hyper_term": totals["hyper_term"] / n,
        "accuracy": totals["correct"] / totals["counted"] if totals["counted"] else math.nan,
        "steps": len(order.split(batch_size)) if len(buffer) else 0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def oracle_agreement(
    predicted1: torch.Tensor, predicted2: torch.Tensor, returns1: torch.Tensor, returns2: torch.Tensor
) -> tuple[float, int]:
    """(score, pairs counted): pairs whose ground-truth returns tie are left out (the noise-free oracle has no
    preference); the others score 1 when the predicted order matches, 0.5 on a predicted tie and 0 otherwise."""
    truth = torch.sign(returns1 - returns2)
    guess = torch.sign(predicted1 - predicted2)
    counted = truth != 0
    score = torch.where(guess == 0, 0.5, (guess == truth).float())
    return float(score[counted].sum()), int(counted.sum())


def preference_accuracy(
    reward_net: torch.nn.Module,
    frames1: torch.Tensor, actions1: torch.Tensor,
    frames2: torch.Tensor, actions2: torch.Tensor,
    returns1: torch.Tensor, returns2: torch.Tensor,
    chunk_pairs: int = 64,
) -> float:
    """How often the reward model orders a pair of fragments as the noise-free oracle does (see `oracle_agreement`),
    evaluated in eval mode; nan when every pair is a ground-truth tie. The net's mode is restored afterwards."""
    was_training = reward_net.training
    reward_net.eval()
    length = actions1.shape[1]
    score, counted = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, frames1.shape[0], chunk_pairs):
                part = slice(start, start + chunk_pairs)
                r1, r2, _ = pair_rewards(reward_net, frames1[part], frames2[part], length)
                s, c = oracle_agreement(
                    fragment_returns(r1, actions1[part]), fragment_returns(r2, actions2[part]),
                    returns1[part], returns2[part],
                )
                score, counted = score + s, counted + c
    finally:
        reward_net.train(was_training)
    return score / counted if counted else math.nan


def reward_function(reward_net: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """r_phi(s, a) for the policy learner: (B, *obs_shape) uint8 and (B,) actions -> (B,), in evaluation mode."""

    def rewards(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if reward_net.training:
            reward_net.eval()
        with torch.no_grad():
            return reward_net(obs).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    return rewards
