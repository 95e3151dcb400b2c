"""Off-policy corrections of a score-function term on stored preference pairs: SoBiRL's implicit term and A-PARL's
upper-level gradient g are both estimated on fragments that older policies collected.

Why the uncorrected term drifts, and what each correction removes, is explained once, in docs/algorithms.md §5.
In short: on a step that a behaviour policy mu chose, the score term (e_{a_t} - pi(.|s)) has mean mu - pi instead
of 0, a push that does not depend on the reward parameters.
    none            the estimator as the papers apply it (the default)
    baseline        l minus the leave-one-out mean l of the minibatch's other pairs
    ratio           each step's score term weighted by pi(a_t|s_t) / mu(a_t|s_t), clipped at --ratio-clip
    ratio-baseline  both
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from agents.infra.cli import flag, require_positive


def leave_one_out_baseline(losses: torch.Tensor) -> torch.Tensor:
    """For each row i (a pair, or a fragment), the mean over the other rows of the minibatch (0 for a minibatch of
    one); rows are along dim 0, so a (N, H) tensor gets a baseline per column.

    Subtracting it keeps the estimator unbiased: the baseline of pair i does not depend on pair i, and the score
    function has mean zero under the policy that drew it. (The plain minibatch mean includes pair i itself and
    shrinks the on-policy gradient by the factor 1 - 1/B.)
    """
    count = losses.shape[0]
    if count < 2:
        return torch.zeros_like(losses)
    return (losses.sum(0) - losses) / (count - 1)


def importance_weights(pi_taken: torch.Tensor, mu_taken: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-step ratios pi(a_t|s_t) / mu(a_t|s_t), clipped above at `clip` (they are weights, never gradients)."""
    return (pi_taken / mu_taken.clamp_min(1e-8)).clamp(max=clip)


CORRECTIONS = ("none", "baseline", "ratio", "ratio-baseline")


class Correction(NamedTuple):
    """The parts of an --implicit-correction: per-step ratios pi/mu, a leave-one-out baseline on the losses."""

    ratios: bool
    baseline: bool


def parse_correction(correction: str) -> Correction:
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; expected one of {', '.join(CORRECTIONS)}")
    return Correction(
        ratios=correction in ("ratio", "ratio-baseline"), baseline=correction in ("baseline", "ratio-baseline")
    )


@dataclass
class CorrectionArgs:
    """The flags of the off-policy corrections (SoBiRL's implicit term, A-PARL's g): a mixin listed before the
    pipeline's flags, `class Args(CorrectionArgs, PreferenceArgs)`, so that `validate` reaches both."""

    implicit_correction: str = flag(
        "none",
        "off-policy correction of the score-function term on stored pairs: none (the paper's estimator), "
        "baseline (leave-one-out mean cross-entropy subtracted), ratio (per-step pi/mu weights), ratio-baseline "
        "(both)",
        choices=CORRECTIONS,
    )
    ratio_clip: float = flag(10.0, "upper clip of the per-step importance ratios pi/mu")

    def validate(self) -> None:
        super().validate()
        require_positive(self, "ratio_clip")
