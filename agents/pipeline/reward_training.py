"""Reward-model training and its measurements: one update and one epoch of a reward loss over the pair buffer, the
accuracies against the oracle and the teacher, predicted returns, and r_phi as the lower level reads it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from agents.feedback.pairs import PairBatch, PairBuffer, pair_observations, split_pairs
from agents.pipeline.ensemble import epoch_order, preference_probabilities, query_uncertainty
from agents.pipeline.losses import (
    POOLED,
    BradleyTerryLoss,
    LossInputs,
    RewardLoss,
    bradley_terry_bce,
    fragment_returns,
)

PolicyProbs = Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, *obs_shape) -> (N, A) action probabilities


# ---------------------------------------------------------------------------------------------------------------
# Reward-model updates


def flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = True) -> torch.Tensor:
    """The gradient of `loss` with respect to `params`, one flat vector (zeros where it does not depend on one)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def capped(vector: torch.Tensor, reference_norm: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`vector` shrunk to norm at most cap * reference_norm, whether it was shrunk); cap <= 0: unchanged."""
    norm = torch.linalg.vector_norm(vector)
    if cap <= 0:
        return vector, torch.zeros((), device=vector.device)
    limit = cap * reference_norm
    shrink = norm > limit
    return torch.where(shrink, vector * (limit / norm.clamp_min(1e-30)), vector), shrink.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two flat vectors (0 if either is zero)."""
    return (a @ b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).clamp_min(1e-30)


class GradientPool:
    """A loss's pooled term (POOLED) over one reward epoch: each minibatch's gradient of it, weighted like that
    minibatch's loss, is summed instead of stepped on; the last minibatch's step adds scale * their weighted mean,
    its norm capped at `cap` times that step's own gradient norm (cap <= 0: no cap). Even and odd minibatches are
    summed apart, so the cosine between the two halves (`split_half_cosine`) measures how much of the pooled
    direction is signal: independent noise gives a cosine near 0, a shared direction one near 1."""

    def __init__(self, params: Sequence[torch.Tensor], scale: float, cap: float):
        self.params = [p for p in params if p.requires_grad]
        self.scale, self.cap = scale, cap
        self.halves: list[torch.Tensor | None] = [None, None]
        self.weight = 0.0
        self.count = 0

    def add(self, term: torch.Tensor, weight: float) -> None:
        if term.requires_grad:
            gradient = flat_gradient(term, self.params) * weight
            half = self.count % 2
            self.halves[half] = gradient if self.halves[half] is None else self.halves[half] + gradient
        self.weight += weight
        self.count += 1

    def apply(self) -> dict[str, torch.Tensor]:
        """Add the pooled step to the parameters' .grad (which hold the last minibatch's own gradient); returns its
        diagnostics: the pooled gradient's norm over the step's own before the cap, whether it was capped, and the
        split-half cosine."""
        halves = [h for h in self.halves if h is not None]
        if not halves or self.weight == 0:
            return {}
        own = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
        own_norm = torch.linalg.vector_norm(own)
        pooled = self.scale * sum(halves) / self.weight
        metrics = {"pooled_ratio": torch.linalg.vector_norm(pooled) / own_norm.clamp_min(1e-30)}
        pooled, metrics["pooled_capped"] = capped(pooled, own_norm, self.cap)
        if len(halves) == 2:
            metrics["split_half_cosine"] = cosine(*halves)
        offset = 0
        for p in self.params:
            size = p.numel()
            part = pooled[offset : offset + size].view_as(p)
            p.grad = part.clone() if p.grad is None else p.grad + part
            offset += size
        return metrics


def probs_in_chunks(policy_probs: PolicyProbs, obs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Policy probabilities for (N, *obs_shape) observations, `chunk` at a time so activations stay small."""
    with torch.no_grad():
        return torch.cat([policy_probs(part) for part in obs.split(chunk)])


def reward_update(
    reward_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pairs: PairBatch,
    loss_fn: RewardLoss,
    alpha: float = 1.0,
    global_step: int = 0,
    policy_probs: PolicyProbs | None = None,
    weight: float = 1.0,
    policy_chunk: int = 1600,
    diagnose: bool = False,
    policy_share: float = 1.0,
    pool: GradientPool | None = None,
    last: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimizer step on `pairs` with `loss_fn`, its loss scaled by `weight`; `policy_share` is
    LossInputs.policy_share (1/K for an ensemble member). A pooled term the loss returns (POOLED) goes to `pool`,
    which the `last` minibatch's step applies; without a pool it joins this step's loss.

    Returns detached tensors (no host round trip): the loss, the mean cross-entropy, hyper_term (the loss minus
    the cross-entropy: what the algorithm adds to DRLHF's fit), the loss's own metrics, the train-mode agreement
    with the noise-free oracle (`correct` / `counted`) and with the teacher's labels (`teacher_correct` /
    `teacher_counted`, the accuracy the authors' code logged). With `diagnose`, also `extra_grad_ratio`: the norm
    of hyper_term's gradient over the cross-entropy's (two extra backward passes).
    """
    batch, length = pairs.actions1.shape
    obs = pair_observations(pairs.frames1, pairs.frames2, length)
    pi1 = pi2 = None
    if loss_fn.needs_policy(global_step):
        if policy_probs is None:
            raise ValueError("this loss needs the current policy: pass policy_probs")
        # Before the reward forward pass: the policy's activations are freed before the reward model's, which
        # autograd keeps until backward, are allocated, so the two never add up in peak memory.
        pi1, pi2 = split_pairs(probs_in_chunks(policy_probs, obs, policy_chunk).float(), batch, length)
    r1, r2 = split_pairs(reward_net(obs), batch, length)
    del obs
    return1, return2 = fragment_returns(r1, pairs.actions1), fragment_returns(r2, pairs.actions2)
    bce = bradley_terry_bce(return1, return2, pairs.labels)
    loss, metrics = loss_fn(LossInputs(pairs, r1, r2, bce, alpha, global_step, pi1, pi2, reward_net, policy_share))
    metrics = dict(metrics)
    pooled = metrics.pop(POOLED, None)
    if pooled is not None:
        metrics["implicit_term"] = pooled.detach()
        if pool is None:
            loss = loss + pooled
    if diagnose:
        extra = loss - bce.mean() + (pooled if pool is not None and pooled is not None else 0.0)
        metrics["extra_grad_ratio"] = gradient_norm_ratio(extra, bce.mean(), reward_net)
    if pool is not None and pooled is not None:
        pool.add(pooled, weight)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    if pool is not None and last:
        metrics.update(pool.apply())
    optimizer.step()
    with torch.no_grad():
        correct, counted = oracle_agreement(return1, return2, pairs.returns1, pairs.returns2)
        teacher_correct, teacher_counted = label_agreement(return1, return2, pairs.labels)
        bce_mean = bce.mean()
        out = {"loss": loss.detach(), "bce": bce_mean, "hyper_term": loss.detach() - bce_mean}
    out.update({key: torch.as_tensor(value).detach() for key, value in metrics.items()})
    return {
        **out,
        "correct": correct,
        "counted": counted,
        "teacher_correct": teacher_correct,
        "teacher_counted": teacher_counted,
    }


def gradient_norm_ratio(extra: torch.Tensor, bce: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """||grad extra|| / ||grad bce|| over the model's parameters (0 when the extra term has no gradient)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not extra.requires_grad:
        return torch.zeros((), device=bce.device)
    norm = lambda loss: torch.linalg.vector_norm(
        torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).flatten()
                for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)
            ]
        )
    )
    return norm(extra) / norm(bce).clamp_min(1e-12)


def reward_epoch(
    reward_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    buffer: PairBuffer,
    batch_size: int,
    loss_fn: RewardLoss | None = None,
    alpha: float = 1.0,
    global_step: int = 0,
    policy_probs: PolicyProbs | None = None,
    generator: torch.Generator | None = None,
    policy_chunk: int = 1600,
    between_steps: Callable[[], None] = lambda: None,
    diagnose: bool = False,
    bootstrap: bool = False,
    policy_share: float = 1.0,
) -> dict[str, float]:
    """One pass over the pair buffer in shuffled minibatches of `batch_size`, the net in training mode throughout
    (with `bootstrap`, over len(buffer) pairs drawn from it with replacement: an ensemble member's resample).

    As in imitation's trainer (which the reference uses), the last, partial minibatch still takes a step, with its
    loss scaled by len / batch_size. The net is left in evaluation mode, ready to produce rewards for SAC.
    `between_steps` runs before every minibatch (the run's stop check). Returns pair-weighted means of loss, bce,
    hyper_term and the loss's metrics, the train-mode accuracy against the oracle (`accuracy`) and against the
    teacher's labels (`teacher_accuracy`), the number of steps, and with `diagnose` the first minibatch's
    `extra_grad_ratio`.
    """
    loss_fn = loss_fn or BradleyTerryLoss()
    if loss_fn.needs_policy(global_step) and policy_probs is None:
        raise ValueError("this loss needs the current policy: pass policy_probs")
    reward_net.train()
    order = epoch_order(len(buffer), bootstrap, generator)
    minibatches = order.split(batch_size) if len(order) else ()  # every pair dropped so far: nothing to fit
    rows = buffer.oldest_first()
    totals: dict[str, torch.Tensor] = {}
    sums = ("correct", "counted", "teacher_correct", "teacher_counted")
    # Taken from one minibatch, not averaged over the epoch: the first's gradient ratio, the pool's diagnostics.
    first_step_only = ("extra_grad_ratio", "pooled_ratio", "pooled_capped", "split_half_cosine")
    pooling = getattr(loss_fn, "pooling", None)  # (scale, cap) of a loss whose POOLED term the epoch pools
    pool = GradientPool(list(reward_net.parameters()), *pooling) if pooling else None
    try:
        for index, part in enumerate(minibatches):
            between_steps()
            step = reward_update(
                reward_net,
                optimizer,
                buffer.get(rows[part]),
                loss_fn,
                alpha,
                global_step,
                policy_probs,
                len(part) / batch_size,
                policy_chunk,
                diagnose=diagnose and index == 0,
                policy_share=policy_share,
                pool=pool,
                last=index == len(minibatches) - 1,
            )
            for key, value in step.items():
                scaled = value if key in sums or key in first_step_only else value * len(part)
                totals[key] = totals[key] + scaled if key in totals else scaled
    finally:
        reward_net.eval()
    n = max(len(buffer), 1)
    out = {key: float(value) / (1 if key in first_step_only else n) for key, value in totals.items() if key not in sums}
    for name, (correct, counted) in {
        "accuracy": ("correct", "counted"),
        "teacher_accuracy": ("teacher_correct", "teacher_counted"),
    }.items():
        total = float(totals.get(counted, 0))
        out[name] = float(totals[correct]) / total if total else math.nan
    out["steps"] = len(minibatches)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def oracle_agreement(
    predicted1: torch.Tensor, predicted2: torch.Tensor, returns1: torch.Tensor, returns2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, pairs counted) as tensors: pairs whose ground-truth returns tie are left out (the noise-free oracle
    has no preference); the others score 1 when the predicted order matches, 0.5 on a predicted tie and 0
    otherwise."""
    truth = torch.sign(returns1 - returns2)
    guess = torch.sign(predicted1 - predicted2)
    counted = truth != 0
    score = torch.where(guess == 0, 0.5, (guess == truth).float())
    return (score * counted).sum(), counted.sum()


def label_agreement(
    predicted1: torch.Tensor, predicted2: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, pairs counted) against the teacher's labels, as the authors' code measured accuracy: pairs labelled
    0.5 are left out, the others score 1 when the predicted order matches the label's side."""
    return oracle_agreement(predicted1, predicted2, labels, torch.full_like(labels, 0.5))


@torch.no_grad()
def predicted_returns(
    reward_net: torch.nn.Module,
    frames1: torch.Tensor,
    actions1: torch.Tensor,
    frames2: torch.Tensor,
    actions2: torch.Tensor,
    chunk_pairs: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's returns (N,) of both fragments of N pairs, in eval mode, `chunk_pairs` pairs per forward
    pass. The net's mode is restored afterwards."""
    was_training = reward_net.training
    reward_net.eval()
    length = actions1.shape[1]
    parts1, parts2 = [], []
    try:
        for start in range(0, frames1.shape[0], chunk_pairs):
            part = slice(start, start + chunk_pairs)
            pairs = len(frames1[part])
            r1, r2 = split_pairs(reward_net(pair_observations(frames1[part], frames2[part], length)), pairs, length)
            parts1.append(fragment_returns(r1, actions1[part]))
            parts2.append(fragment_returns(r2, actions2[part]))
    finally:
        reward_net.train(was_training)
    empty = frames1.new_zeros(0, dtype=torch.float32)
    return (torch.cat(parts1), torch.cat(parts2)) if parts1 else (empty, empty)


def preference_accuracy(
    reward_net: torch.nn.Module,
    frames1: torch.Tensor,
    actions1: torch.Tensor,
    frames2: torch.Tensor,
    actions2: torch.Tensor,
    returns1: torch.Tensor,
    returns2: torch.Tensor,
    chunk_pairs: int = 64,
) -> float:
    """How often the reward model orders a pair of fragments as the noise-free oracle does (see `oracle_agreement`),
    evaluated in eval mode; nan when every pair is a ground-truth tie."""
    predicted1, predicted2 = predicted_returns(reward_net, frames1, actions1, frames2, actions2, chunk_pairs)
    score, counted = oracle_agreement(predicted1, predicted2, returns1, returns2)
    return float(score) / int(counted) if int(counted) else math.nan


def ensemble_uncertainty(members: Sequence[torch.nn.Module], pairs: PairBatch, mode: str) -> torch.Tensor:
    """Per-pair uncertainty (`agents.pipeline.ensemble.query_uncertainty`) of the members' preference probabilities."""
    returns = [predicted_returns(net, pairs.frames1, pairs.actions1, pairs.frames2, pairs.actions2) for net in members]
    return query_uncertainty(
        preference_probabilities(torch.stack([r[0] for r in returns]), torch.stack([r[1] for r in returns])), mode
    )


def mean_stats(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise means of the ensemble members' epoch statistics (a key only some members report: their mean)."""
    keys = dict.fromkeys(key for member in stats for key in member)
    return {key: sum(m[key] for m in stats if key in m) / sum(key in m for m in stats) for key in keys}


def reward_function(
    reward_net: torch.nn.Module, train_mode: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """r_phi(s, a) for the policy learner: (B, *obs_shape) uint8 and (B,) actions -> (B,), in evaluation mode (or in
    training mode, as the authors' code did, with `train_mode`)."""

    def rewards(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if reward_net.training != train_mode:
            reward_net.train(train_mode)
        with torch.no_grad():
            return reward_net(obs).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    return rewards


# ---------------------------------------------------------------------------------------------------------------
# Does the learned reward order what the true reward orders? (Ibarz et al. 2018 plot these correlations.)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of `values`, ties sharing the mean of their ranks (what Spearman's correlation needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, group = np.unique(values, return_inverse=True)
    return (np.bincount(group, weights=ranks) / np.bincount(group))[group]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's correlation; nan when either side is constant (or has fewer than two values)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    scale = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / scale) if scale > 0 else math.nan


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); nan when either side is constant."""
    return pearson(average_ranks(x), average_ranks(y))


@torch.no_grad()
def learned_returns_of_steps(
    reward_net: torch.nn.Module,
    obs_of: Callable[[torch.Tensor], torch.Tensor],
    actions: torch.Tensor,
    segments: torch.Tensor,
    chunk: int = 1024,
) -> torch.Tensor:
    """Sum of r_phi(s_t, a_t) over each segment of consecutive steps, in eval mode (the net's mode is restored).

    `obs_of(index)` builds the observations of the steps `index` (a LongTensor into `actions`); `segments` (G,) is
    each segment's length, the steps of segment g following those of g - 1."""
    was_training = reward_net.training
    reward_net.eval()
    try:
        taken = []
        for start in range(0, len(actions), chunk):
            index = torch.arange(start, min(start + chunk, len(actions)), device=actions.device)
            taken.append(reward_net(obs_of(index)).gather(-1, actions[index].long().unsqueeze(-1)).squeeze(-1))
    finally:
        reward_net.train(was_training)
    per_step = torch.cat(taken) if taken else actions.new_zeros(0, dtype=torch.float32)
    group = torch.repeat_interleave(torch.arange(len(segments), device=per_step.device), segments.to(per_step.device))
    return torch.zeros(len(segments), device=per_step.device).index_add_(0, group, per_step.float())
