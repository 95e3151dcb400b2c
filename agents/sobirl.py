"""SoBiRL (arXiv 2405.19697, Algorithm 3): preference-based reward learning with the one-step hyper-gradient.

The upper level fits a reward model r_phi to trajectory preferences; the lower level is SAC-discrete on r_phi. The
reward update descends the practical hyper-gradient estimator (78):

    mean over pairs of  grad l  +  l * (1/alpha) * sum over both fragments and all steps of
                                  (grad r(s_t, a_t) - sum_a pi(a|s_t) grad r(s_t, a))

with l the Bradley-Terry cross-entropy of the pair. The second term is a score-function (REINFORCE) estimate of
how the fragment distribution moves with phi through the soft-optimal policy, truncated after one step of the
Bellman recursion (exact when the lower level's discount is 0). `sobirl_loss` is a scalar whose gradient is that
estimator; with inv_alpha = 0 it is DRLHF's loss.

    python agents/sobirl.py --env-id BeamRiderNoFrameskip-v4
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from agents.common import flag, require_non_negative, run_cli
from agents.losses import LossInputs, bradley_terry_bce, fragment_returns
from agents.preference import PreferenceArgs, PreferenceLearner, run_preference_rl

ALGO = "sobirl"


def advantage_sum(rewards: torch.Tensor, actions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """sum_t (r(s_t, a_t) - sum_a pi(a|s_t) r(s_t, a)) per fragment, (B,); pi is a constant here."""
    taken = rewards.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    expected = (rewards * probs.detach()).sum(-1)
    return (taken - expected).sum(-1)


def implicit_term(
    bce: torch.Tensor, r1: torch.Tensor, a1: torch.Tensor, pi1: torch.Tensor,
    r2: torch.Tensor, a2: torch.Tensor, pi2: torch.Tensor, inv_alpha: float, baseline: bool = False,
) -> torch.Tensor:
    """Per-pair surrogate l * (1/alpha) * (advantage sums of both fragments), l a constant; (B,)."""
    weight = bce.detach() - bce.detach().mean() if baseline else bce.detach()
    return weight * inv_alpha * (advantage_sum(r1, a1, pi1) + advantage_sum(r2, a2, pi2))


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
    hyper_mean = implicit_term(bce, r1, a1, pi1, r2, a2, pi2, inv_alpha, baseline).mean()
    return bce_mean + hyper_mean, bce_mean.detach(), hyper_mean.detach()


def sobirl_loss(
    r1: torch.Tensor, a1: torch.Tensor, pi1: torch.Tensor | None,
    r2: torch.Tensor, a2: torch.Tensor, pi2: torch.Tensor | None,
    y: torch.Tensor, inv_alpha: float, baseline: bool = False,
) -> torch.Tensor:
    """The SoBiRL upper-level surrogate loss for a batch of B preference pairs (the paper's estimator (78)).

    r1, r2: (B, H, A) per-action rewards of the fragments' observations (carrying gradient); a1, a2: (B, H) actions
    taken; pi1, pi2: (B, H, A) current-policy action probabilities (treated as constants; may be None when
    inv_alpha == 0); y: (B,) probability that fragment 1 is preferred; inv_alpha: 1/alpha, the implicit term's
    coefficient. inv_alpha = 0 gives DRLHF's loss, the mean Bradley-Terry cross-entropy, exactly.

    baseline=True (not in the paper) weights the implicit term by l minus the batch-mean l: the same expected
    gradient on-policy (the score function has zero mean under pi) with lower variance.
    """
    return sobirl_loss_terms(r1, a1, pi1, r2, a2, pi2, y, inv_alpha, baseline)[0]


class SoBiRLLoss:
    """Bradley-Terry cross-entropy plus the implicit term (1/alpha coefficient) once global_step > hyper_start."""

    def __init__(self, hyper_start: int = 100_000, baseline: bool = False):
        self.hyper_start = hyper_start
        self.baseline = baseline

    def needs_policy(self, global_step: int) -> bool:
        return global_step > self.hyper_start

    def __call__(self, x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bce = x.bce.mean()
        if not self.needs_policy(x.global_step):
            return bce, {"inv_alpha": torch.zeros(())}
        inv_alpha = 1.0 / x.alpha
        p = x.pairs
        hyper = implicit_term(x.bce, x.r1, p.actions1, x.pi1, x.r2, p.actions2, x.pi2, inv_alpha, self.baseline)
        return bce + hyper.mean(), {"inv_alpha": torch.tensor(inv_alpha)}


# ---------------------------------------------------------------------------------------------------------------
# The algorithm: DRLHF's pipeline (agents/preference.py) with the implicit term.


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

    RESUMABLE: ClassVar[frozenset[str]] = PreferenceArgs.RESUMABLE

    def validate(self) -> None:
        super().validate()
        require_non_negative(self, "hyper_start")


def make_loss(args: Args, trainer) -> SoBiRLLoss:
    return SoBiRLLoss(args.hyper_start, args.hyper_baseline)


def main(argv: Sequence[str] | None = None) -> PreferenceLearner:
    return run_preference_rl(ALGO, Args, argv, make_loss, __doc__)


if __name__ == "__main__":
    run_cli(main)
