"""The seam between the preference pipeline and the algorithms: upper-level reward losses.

Each preference algorithm is the shared outer loop (`agents/pipeline/learner.py`) plus one reward loss. A loss is a
small object with two methods:

    needs_policy(global_step) -> bool      # evaluate the current policy on the minibatch's observations?
    __call__(inputs: LossInputs) -> (loss, metrics)

`LossInputs` carries what any of them may use: the minibatch of labelled pairs (with the behaviour probabilities
of the policies that collected them), the reward model's per-action outputs on both fragments, the per-pair
Bradley-Terry cross-entropy, the current policy's probabilities (when asked for), the SAC temperature and the
global step. A loss that needs more (a demonstration dataset, the actor's parameters) is built with it.

The primitives every loss shares live here too: fragment returns and the Bradley-Terry cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from agents.feedback.pairs import LOGIT_CLAMP


def fragment_returns(rewards: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Sum over steps of r(s_t, a_t): (B, H, A) per-action rewards and (B, H) actions -> (B,)."""
    return rewards.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1).sum(-1)


def bradley_terry_bce(return1: torch.Tensor, return2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pair cross-entropy of P(fragment 1 preferred) = sigmoid(R1 - R2) against the label y, (B,)."""
    logit = torch.clamp(return1 - return2, -LOGIT_CLAMP, LOGIT_CLAMP)
    return F.binary_cross_entropy_with_logits(logit, y.to(logit.dtype), reduction="none")


@dataclass
class LossInputs:
    """One minibatch of B labelled pairs of H-step fragments, as the reward losses see it."""

    pairs: Any  # agents.feedback.pairs.PairBatch: frames, actions, labels, behaviour probabilities, collection steps
    r1: torch.Tensor  # (B, H, A) reward-model outputs for fragment 1's observations, carrying gradient
    r2: torch.Tensor  # (B, H, A) for fragment 2
    bce: torch.Tensor  # (B,) Bradley-Terry cross-entropy of each pair, carrying gradient
    alpha: float  # the current SAC temperature
    global_step: int
    pi1: torch.Tensor | None = None  # (B, H, A) current-policy probabilities (constants), if the loss asked
    pi2: torch.Tensor | None = None
    # The reward model being trained (in training mode), for losses with terms beyond the pairs (demonstrations).
    model: torch.nn.Module | None = None
    # The share of the policy's reward this model supplies: 1, or 1/K for one of K ensemble members (the policy
    # learns their mean, so d pi / d phi_k carries 1/K). Terms that differentiate through the policy scale by it.
    policy_share: float = 1.0


# A loss may return, among its metrics, POOLED: a scalar carrying gradient that the reward epoch does not step on
# per minibatch but pools over the epoch and applies once (`GradientPool` in agents/pipeline/reward_training.py,
# with the loss's `pooling` = (scale, cap)); called outside an epoch, the term is simply added to the loss.
POOLED = "pooled_term"


class RewardLoss(Protocol):
    # Optional: the policy to evaluate when needs_policy says so; None or absent: the learner's current policy.
    # Optional too: state_dict() and load_state_dict(state) for state of the loss's own (its generators), which the
    # learner then keeps in every checkpoint.
    policy_probs: Callable[[torch.Tensor], torch.Tensor] | None

    def needs_policy(self, global_step: int) -> bool: ...

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class BradleyTerryLoss:
    """DRLHF's upper-level loss: the mean Bradley-Terry cross-entropy, blind to how the reward shapes the policy."""

    policy_probs = None

    def needs_policy(self, global_step: int) -> bool:
        return False

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return inputs.bce.mean(), {}
