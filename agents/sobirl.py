"""SoBiRL (arXiv 2405.19697, Algorithm 3): preference-based reward learning with the one-step hyper-gradient.

The upper level fits a reward model r_phi to trajectory preferences; the lower level is SAC-discrete on r_phi. The
reward update descends the practical hyper-gradient estimator (78):

    mean over pairs of  grad l  +  l * (1/alpha) * sum over both fragments and all steps of
                                  (grad r(s_t, a_t) - sum_a pi(a|s_t) grad r(s_t, a))

with l the Bradley-Terry cross-entropy of the pair. `sobirl_loss` is a scalar whose gradient is that estimator;
with inv_alpha = 0 it is DRLHF's loss, so both algorithms train their reward models through it.

    python agents/sobirl.py --env-id BeamRiderNoFrameskip-v4
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from agents.common import flag, run_cli
from agents.preference import LOGIT_CLAMP, PreferenceArgs, fragment_returns, run_preference_rl
from agents.sac_discrete import SACTrainer


def bradley_terry_bce(return1: torch.Tensor, return2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pair cross-entropy of P(fragment 1 preferred) = sigmoid(R1 - R2) against the label y, (B,)."""
    logit = torch.clamp(return1 - return2, -LOGIT_CLAMP, LOGIT_CLAMP)
    return F.binary_cross_entropy_with_logits(logit, y.to(logit.dtype), reduction="none")


def advantage_sum(rewards: torch.Tensor, actions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """sum_t (r(s_t, a_t) - sum_a pi(a|s_t) r(s_t, a)) per fragment, (B,); pi is a constant here."""
    taken = rewards.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    expected = (rewards * probs.detach()).sum(-1)
    return (taken - expected).sum(-1)


def sobirl_loss_terms(
    r1: torch.Tensor, a1: torch.Tensor, pi1: torch.Tensor | None,
    r2: torch.Tensor, a2: torch.Tensor, pi2: torch.Tensor | None,
    y: torch.Tensor, inv_alpha: float, baseline: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean BCE, mean implicit term); loss = mean BCE + mean implicit term. See `sobirl_loss`."""
    bce = bradley_terry_bce(fragment_returns(r1, a1), fragment_returns(r2, a2), y)
    bce_mean = bce.mean()
    if inv_alpha == 0:
        return bce_mean, bce_mean.detach(), torch.zeros((), dtype=bce.dtype, device=bce.device)
    if pi1 is None or pi2 is None:
        raise ValueError("the implicit term (inv_alpha != 0) needs the policy's action probabilities pi1 and pi2")
    weight = bce.detach() - bce.detach().mean() if baseline else bce.detach()
    implicit = weight * inv_alpha * (advantage_sum(r1, a1, pi1) + advantage_sum(r2, a2, pi2))
    hyper_mean = implicit.mean()
    return bce_mean + hyper_mean, bce_mean.detach(), hyper_mean.detach()


def sobirl_loss(
    r1: torch.Tensor, a1: torch.Tensor, pi1: torch.Tensor | None,
    r2: torch.Tensor, a2: torch.Tensor, pi2: torch.Tensor | None,
    y: torch.Tensor, inv_alpha: float, baseline: bool = False,
) -> torch.Tensor:
    """The SoBiRL upper-level surrogate loss for a batch of B preference pairs.

    r1, r2: (B, H, A) per-action rewards of the fragments' observations (carrying gradient); a1, a2: (B, H) actions
    taken; pi1, pi2: (B, H, A) current-policy action probabilities (treated as constants; may be None when
    inv_alpha == 0); y: (B,) probability that fragment 1 is preferred; inv_alpha: 1/alpha, the implicit term's
    coefficient. inv_alpha = 0 gives DRLHF's loss, the mean Bradley-Terry cross-entropy, exactly.

    baseline=True (not in the paper) weights the implicit term by l minus the batch-mean l: the same expected
    gradient (the score function has zero mean under pi) with lower variance. Without it every pair pushes the
    rewards of its taken actions below the policy average, since l >= 0.
    """
    return sobirl_loss_terms(r1, a1, pi1, r2, a2, pi2, y, inv_alpha, baseline)[0]



# ---------------------------------------------------------------------------------------------------------------
# The algorithm: DRLHF's pipeline (agents/preference.py) with the implicit term switched on.


@dataclass
class Args(PreferenceArgs):
    exp_name: str = flag("sobirl", "name of this experiment (part of the run name)")
    hyper_start: int = flag(
        100_000, "the implicit term is on once global_step exceeds this (the reference code's threshold); 0 before"
    )
    hyper_baseline: bool = flag(
        False, "subtract the minibatch-mean cross-entropy from the implicit term's weight (variance reduction; "
        "not in the paper)"
    )


def main(argv: Sequence[str] | None = None) -> SACTrainer:
    return run_preference_rl(Args, argv, implicit=True, description=__doc__)


if __name__ == "__main__":
    run_cli(main)
