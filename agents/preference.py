"""Preference-based reward learning shared by DRLHF and SoBiRL: fragments, synthetic teachers, the pair schedule,
the pair buffer, reward-model epochs and preference accuracy.

A fragment is stored as `frames`, uint8 (H + stack - 1, *frame_shape): the observation at step h is
frames[h : h + stack] (frames[h] when stack == 1), so a 25-step Atari fragment costs 28 frames instead of 100.
Ground-truth rewards reach the reward learner only through the teachers' labels; the returns kept next to each
pair serve the accuracy metrics alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from agents import sac_discrete as sac
from agents.common import UsageError, flag, require, require_positive
from agents.reward_model import RewardCNN

PolicyProbs = Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, *obs_shape) -> (N, A) action probabilities

# The reference clamps the return difference before the sigmoid (RLHF.py:480); with it, log P >= -50 and the loss
# never saturates to inf.
LOGIT_CLAMP = 50.0


def fragment_returns(rewards: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Sum over steps of r(s_t, a_t): (B, H, A) per-action rewards and (B, H) actions -> (B,)."""
    return rewards.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1).sum(-1)


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

    def state_dict(self) -> dict:
        stored = self.get(self.oldest_first())
        fields = {name: getattr(stored, name).cpu() for name in PairBatch.__dataclass_fields__}
        return {"total_added": self.total_added, **fields}

    def load_state_dict(self, state: dict) -> None:
        self.pos = self.size = 0
        self.add(PairBatch(*(state[k] for k in PairBatch.__dataclass_fields__)))
        self.total_added = int(state["total_added"])

    @staticmethod
    def _slice(pairs: PairBatch, part: slice) -> PairBatch:
        return PairBatch(*(getattr(pairs, name)[part] for name in PairBatch.__dataclass_fields__))


# ---------------------------------------------------------------------------------------------------------------
# Reward-model updates


def probs_in_chunks(policy_probs: PolicyProbs, obs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Policy probabilities for (N, *obs_shape) observations, `chunk` at a time so activations stay small."""
    with torch.no_grad():
        return torch.cat([policy_probs(part) for part in obs.split(chunk)])


def pair_observations(frames1: torch.Tensor, frames2: torch.Tensor, length: int) -> torch.Tensor:
    """Both fragments of every pair as one (2 B H, *obs_shape) batch, fragment 1 first.

    One batch matters beyond speed: in training mode BatchNorm normalises over both fragments of every pair together.
    """
    return fragment_observations(torch.cat([frames1, frames2]), length)


def split_pairs(values: torch.Tensor, pairs: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2 B H, A) per-observation values of `pair_observations` -> (B, H, A) for fragment 1 and for fragment 2."""
    both = values.view(2, pairs, length, -1)
    return both[0], both[1]


def reward_update(
    reward_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pairs: PairBatch,
    inv_alpha: float,
    policy_probs: PolicyProbs | None = None,
    weight: float = 1.0,
    policy_chunk: int = 1600,
    hyper_baseline: bool = False,
) -> dict[str, float]:
    """One optimizer step on `pairs` with the SoBiRL loss (the BCE alone when inv_alpha == 0), scaled by `weight`.

    The policy is evaluated only when the implicit term is on. Returns the step's loss, bce, hyper_term and the
    train-mode accuracy against the oracle (nan when every pair is a ground-truth tie).
    """
    # agents.sobirl builds its script on this module, so its loss is imported when first needed.
    from agents.sobirl import sobirl_loss_terms

    batch, length = pairs.actions1.shape
    obs = pair_observations(pairs.frames1, pairs.frames2, length)
    pi1 = pi2 = None
    if inv_alpha != 0:
        # Before the reward forward pass: the policy's activations are freed before the reward model's, which
        # autograd keeps until backward, are allocated, so the two never add up in peak memory.
        pi1, pi2 = split_pairs(probs_in_chunks(policy_probs, obs, policy_chunk).float(), batch, length)
    rewards = reward_net(obs)
    del obs
    r1, r2 = split_pairs(rewards, batch, length)
    loss, bce, hyper = sobirl_loss_terms(
        r1, pairs.actions1, pi1, r2, pairs.actions2, pi2, pairs.labels, inv_alpha, hyper_baseline
    )
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
    hyper_baseline: bool = False,
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
                reward_net, optimizer, pairs, inv_alpha, policy_probs, len(part) / batch_size, policy_chunk,
                hyper_baseline,
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
                pairs = len(frames1[part])
                r1, r2 = split_pairs(reward_net(pair_observations(frames1[part], frames2[part], length)), pairs, length)
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


# ---------------------------------------------------------------------------------------------------------------
# The outer loop shared by DRLHF and SoBiRL


def enable_huge_pages() -> None:
    """Back PyTorch's large CPU tensors with 2 MB pages (read once, at PyTorch's first CPU allocation, so call this
    before creating any tensor). Every reward update allocates about a gigabyte of fresh activations; with 4 KB
    pages faulting them in costs about a third of the update on CPU."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@dataclass
class PreferenceArgs(sac.Args):
    total_timesteps: int = flag(4_300_000, "total environment steps, over all environments (the paper's 4.3M)")
    teacher: str = flag("oracle", "synthetic teacher: oracle (higher clipped return preferred, ties 0.5; the paper's "
                        "text) or bernoulli (Bradley-Terry sampled labels; the authors' code)", choices=TEACHERS)
    initial_pairs: int = flag(600, "pairs labelled before the first reward training (the warm-up)")
    warmup_epochs: int = flag(512, "reward-model epochs over the initial pairs")
    total_pairs: int = flag(9_000, "query budget of the schedule, initial pairs included")
    schedule_iterations: int = flag(2_000, "outer iterations over which the hyperbolic schedule spreads the budget")
    inner_steps: int = flag(10_000, "SAC environment steps per outer iteration")
    fragment_length: int = flag(25, "agent steps per fragment")
    pair_buffer: int = flag(3_000, "capacity of the FIFO of labelled pairs")
    reward_batch_size: int = flag(64, "pairs per reward-model minibatch")
    reward_lr: float = flag(3e-4, "AdamW learning rate of the reward model")
    reward_weight_decay: float = flag(0.01, "AdamW weight decay of the reward model")
    fresh_pairs: int = flag(64, "fragment pairs of the latest policy scored for reward/accuracy_fresh (0: off)")
    accuracy_pairs: int = flag(0, "newest stored pairs scored for reward/accuracy_train (0: all)")
    policy_chunk: int = flag(1600, "observations per policy forward pass in the implicit term (bounds memory)")


def validate_preference(args: PreferenceArgs) -> None:
    sac.validate(args)
    require_positive(
        args, "initial_pairs", "inner_steps", "fragment_length", "pair_buffer", "reward_batch_size", "reward_lr",
        "policy_chunk",
    )
    for name in ("warmup_epochs", "schedule_iterations", "fresh_pairs", "accuracy_pairs", "reward_weight_decay"):
        value = getattr(args, name)
        require(value >= 0, f"--{name.replace('_', '-')} must be non-negative, got {value}")
    require(
        args.initial_pairs <= args.pair_buffer,
        f"--initial-pairs {args.initial_pairs} is more than --pair-buffer {args.pair_buffer} can hold",
    )
    require(
        args.total_pairs >= args.initial_pairs,
        f"--total-pairs {args.total_pairs} is smaller than --initial-pairs {args.initial_pairs}",
    )
    steps_per_env = args.inner_steps // args.num_envs
    require(
        args.fragment_length <= steps_per_env,
        f"--fragment-length {args.fragment_length} is longer than a rollout: --inner-steps {args.inner_steps} gives "
        f"{steps_per_env} steps per env",
    )
    slots = args.buffer_size // args.num_envs
    require(
        args.fragment_length + 8 <= slots,
        f"--fragment-length {args.fragment_length} does not fit the replay: --buffer-size {args.buffer_size} keeps "
        f"{slots} steps per env",
    )
    if hasattr(args, "hyper_start"):
        require(args.hyper_start >= 0, f"--hyper-start must be non-negative, got {args.hyper_start}")


class PreferenceLearner:
    """Reward model, pair buffer and query schedule around a SACTrainer; `train` runs the whole outer loop.

    Outer iteration i: gather schedule[i] pairs from the most recent rollouts, label them with the synthetic
    teacher, train the reward model (warmup_epochs epochs at i = 0, one epoch after), then run SAC for
    `inner_steps` env steps on r_phi. Iteration 0 first rolls out min(2 * initial_pairs * fragment_length,
    learning_starts) env steps of SAC's uniform-random phase (at least one fragment's worth); unlike the reference
    code's uncounted rollout, these steps count in global_step and the total budget.
    """

    def __init__(self, args: PreferenceArgs, trainer: sac.SACTrainer, implicit: bool):
        self.args = args
        self.trainer = trainer
        self.implicit = implicit
        self.device = trainer.device
        try:
            self.reward_net = RewardCNN(trainer.obs_shape, trainer.num_actions).to(self.device)
        except ValueError as err:
            raise UsageError(f"--env-id {args.env_id}: {err}") from None
        self.optimizer = torch.optim.AdamW(
            self.reward_net.parameters(), lr=args.reward_lr, weight_decay=args.reward_weight_decay
        )
        buffer = trainer.buffer
        self.pairs = PairBuffer(args.pair_buffer, args.fragment_length, buffer.frame_shape, buffer.stack, self.device)
        self.schedule = pairs_schedule(args.initial_pairs, args.total_pairs, args.schedule_iterations)
        self.iteration = 0  # the next reward phase
        self.sac_end = 0  # global step where the current SAC phase ends
        self.fragment_generator = torch.Generator(device=self.device)
        self.fragment_generator.manual_seed(args.seed + 7919)
        self.cpu_generator = torch.Generator()
        self.cpu_generator.manual_seed(args.seed + 104729)
        self.reward_net.eval()
        # Set from the start so that no SAC update ever sees the true reward.
        trainer.reward_fn = reward_function(self.reward_net)
        trainer.extra_state = self.state_dict
        trainer.load_extra_state = self.load_state_dict

    @property
    def hyper_start(self) -> int:
        return getattr(self.args, "hyper_start", 0)

    def inv_alpha(self) -> float:
        """1/alpha once global_step passes --hyper-start (SoBiRL), else 0 (DRLHF, and SoBiRL's early iterations)."""
        if self.implicit and self.trainer.global_step > self.hyper_start:
            return 1.0 / self.trainer.alpha
        return 0.0

    def train(self) -> None:
        total = self.args.total_timesteps
        while True:
            if self.trainer.global_step < self.sac_end:  # also finishes a phase cut short by a checkpoint
                self.trainer.phase = "sac"
                self.trainer.run(self.sac_end - self.trainer.global_step)
            if self.trainer.global_step >= total:
                return
            if self.iteration > 0:
                self.log_fresh_accuracy()
            self.reward_phase()
            self.sac_end = min(self.trainer.global_step + self.args.inner_steps, total)

    def reward_phase(self) -> None:
        a, i = self.args, self.iteration
        if i == 0:
            rollout = max(a.fragment_length + 1, min(2 * a.initial_pairs * a.fragment_length, a.learning_starts))
            self.ensure_rollouts(-(-rollout // a.num_envs))
        new_pairs = self.schedule[i] if i < len(self.schedule) else 0
        if new_pairs > 0:
            window = 2 * new_pairs * a.fragment_length if i > 0 else self.trainer.buffer.written * a.num_envs
            self.pairs.add(self.gather_pairs(new_pairs, window))
        self.trainer.phase = "reward"
        inv_alpha = self.inv_alpha()
        policy = self.trainer.policy_probs if inv_alpha else None
        epochs = a.warmup_epochs if i == 0 else 1
        stats = None
        # The warm-up (512 epochs over 600 pairs) takes about an hour on a CPU: show it.
        for _ in tqdm(range(epochs), desc="reward warm-up", unit="epoch", leave=False,
                      disable=not a.progress or epochs == 1):
            stats = reward_epoch(
                self.reward_net, self.optimizer, self.pairs, a.reward_batch_size, inv_alpha, policy,
                self.cpu_generator, a.policy_chunk, getattr(a, "hyper_baseline", False),
            )
        self.reward_net.eval()
        self.iteration += 1
        self.log_reward_phase(stats, inv_alpha, new_pairs)

    def ensure_rollouts(self, steps_per_env: int) -> None:
        """Step the environments until the replay holds `steps_per_env` steps per env (all of them if fewer)."""
        missing = min(steps_per_env, self.trainer.buffer.slots - 2) - (self.trainer.buffer.written - 1)
        if missing > 0:
            self.trainer.phase = "rollout"
            self.trainer.run(missing * self.args.num_envs)

    def sample_fragments(self, count: int, window_steps: int):
        """`count` fragments from each env's latest `window_steps` steps (over all envs), widening the window when
        episode ends leave no room for a whole fragment."""
        length, buffer = self.args.fragment_length, self.trainer.buffer
        self.ensure_rollouts(length + 1)
        recent = max(length, -(-window_steps // self.args.num_envs))
        while True:
            try:
                return buffer.recent_fragments(length, count, recent, self.fragment_generator)
            except RuntimeError:
                if recent >= buffer.written - 1:
                    raise
                recent = min(2 * recent, buffer.written - 1)

    def gather_pairs(self, count: int, window_steps: int) -> PairBatch:
        frames, actions, rewards = self.sample_fragments(2 * count, window_steps)
        returns = rewards.sum(1)
        first, second = slice(0, None, 2), slice(1, None, 2)
        labels = label_pairs(self.args.teacher, returns[first], returns[second], self.cpu_generator)
        return PairBatch(
            frames[first], actions[first], frames[second], actions[second], labels, returns[first], returns[second]
        )

    def stored_accuracy(self) -> float:
        rows = self.pairs.oldest_first()
        if self.args.accuracy_pairs:
            rows = rows[-self.args.accuracy_pairs:]
        p = self.pairs.get(rows)
        return preference_accuracy(
            self.reward_net, p.frames1, p.actions1, p.frames2, p.actions2, p.returns1, p.returns2
        )

    def log_reward_phase(self, stats: dict | None, inv_alpha: float, new_pairs: int) -> None:
        step, log = self.trainer.global_step, self.trainer.log_scalar
        if stats is not None:
            for key in ("loss", "bce", "hyper_term"):
                log(f"reward/{key}", stats[key], step)
        log("reward/accuracy_train", self.stored_accuracy(), step)
        log("reward/num_pairs", len(self.pairs), step)
        log("reward/new_pairs", new_pairs, step)
        log("reward/inv_alpha", inv_alpha, step)
        log("reward/iteration", self.iteration, step)

    def log_fresh_accuracy(self) -> None:
        """Accuracy of the reward model the policy has just trained on, on the policy's own latest fragments."""
        if self.args.fresh_pairs <= 0:
            return
        p = self.gather_pairs(self.args.fresh_pairs, self.args.inner_steps)
        accuracy = preference_accuracy(
            self.reward_net, p.frames1, p.actions1, p.frames2, p.actions2, p.returns1, p.returns2
        )
        self.trainer.log_scalar("reward/accuracy_fresh", accuracy, self.trainer.global_step)

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "sac_end": self.sac_end,
            "reward_net": self.reward_net.state_dict(),
            "reward_optimizer": self.optimizer.state_dict(),
            "pairs": self.pairs.state_dict(),
            "fragment_generator": self.fragment_generator.get_state(),
            "cpu_generator": self.cpu_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.sac_end = int(state["iteration"]), int(state["sac_end"])
        self.reward_net.load_state_dict(state["reward_net"])
        self.reward_net.eval()
        self.optimizer.load_state_dict(state["reward_optimizer"])
        self.pairs.load_state_dict(state["pairs"])
        self.fragment_generator.set_state(state["fragment_generator"].cpu())
        self.cpu_generator.set_state(state["cpu_generator"].cpu())


def run_preference_rl(
    args_cls: type[PreferenceArgs], argv: Sequence[str] | None, implicit: bool, description: str | None = None
) -> sac.SACTrainer:
    """Parse, validate, build, and run DRLHF (implicit=False) or SoBiRL (implicit=True) to completion."""
    enable_huge_pages()
    args, state = sac.parse_or_resume(args_cls, argv, description)
    validate_preference(args)
    device = sac.prepare(args)
    trainer = sac.SACTrainer(args, device)
    try:
        learner = PreferenceLearner(args, trainer, implicit)
    except UsageError:
        trainer.close()
        raise
    run_name = sac.start_or_resume(trainer, args, state)
    print(f"run {run_name} on {device}: logs in {trainer.checkpoint_path.parent}")
    sac.run_to_completion(trainer, learner.train)
    return trainer
