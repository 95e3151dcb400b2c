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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from agents.infra.cli import flag, require_non_negative, run_cli
from agents.pipeline.corrections import CorrectionArgs, importance_weights, leave_one_out_baseline, parse_correction
from agents.pipeline.learner import PreferenceArgs, PreferenceLearner, run_preference_rl
from agents.pipeline.losses import LossInputs, bradley_terry_bce, fragment_returns

ALGO = "sobirl"


def advantage_sum(
    rewards: torch.Tensor, actions: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_t w_t (r(s_t, a_t) - sum_a pi(a|s_t) r(s_t, a)) per fragment, (B,); pi and w are constants (w = 1 if None).

    Its gradient at one step is w_t (e_{a_t} - pi(.|s_t)) on r(s_t, .): the score function of the soft-optimal
    policy, up to 1/alpha and the one-step truncation of grad Q - grad V.
    """
    taken = rewards.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    expected = (rewards * probs.detach()).sum(-1)
    advantage = taken - expected
    if weights is not None:
        advantage = advantage * weights.detach()
    return advantage.sum(-1)


def implicit_term(
    bce: torch.Tensor,
    r1: torch.Tensor,
    a1: torch.Tensor,
    pi1: torch.Tensor,
    r2: torch.Tensor,
    a2: torch.Tensor,
    pi2: torch.Tensor,
    inv_alpha: float,
    baseline: bool = False,
    w1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair surrogate (l - b) * (1/alpha) * (weighted advantage sums of both fragments), (B,), l a constant;
    b the leave-one-out baseline with `baseline`, else 0; w1, w2 optional per-step weights (B, H)."""
    weight = bce.detach()
    if baseline:
        weight = weight - leave_one_out_baseline(weight)
    return weight * inv_alpha * (advantage_sum(r1, a1, pi1, w1) + advantage_sum(r2, a2, pi2, w2))


def sobirl_loss_terms(
    r1: torch.Tensor,
    a1: torch.Tensor,
    pi1: torch.Tensor | None,
    r2: torch.Tensor,
    a2: torch.Tensor,
    pi2: torch.Tensor | None,
    y: torch.Tensor,
    inv_alpha: float,
    baseline: bool = False,
    *,
    step_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    pair_weights: torch.Tensor | None = None,
    implicit_scale: float = 1.0,
    implicit_rewards: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean BCE, implicit term as it enters the loss); loss = mean BCE + implicit_scale * mean implicit term.
    See `sobirl_loss` for the arguments the paper's estimator takes; the keyword-only ones are what `SoBiRLLoss`'s
    flags add: per-step weights (w1, w2) (B, H) of the score terms (--implicit-correction ratio), a weight per pair
    (B,) (--implicit-pairs learned: 0 for the random phase's pairs), the scale of the whole term (an ensemble
    member's policy share) and the rewards the term differentiates (--clamp-aware: the clamped ones SAC sees)."""
    bce = bradley_terry_bce(fragment_returns(r1, a1), fragment_returns(r2, a2), y)
    bce_mean = bce.mean()
    if inv_alpha == 0:
        return bce_mean, bce_mean.detach(), torch.zeros((), dtype=bce.dtype, device=bce.device)
    if pi1 is None or pi2 is None:
        raise ValueError("the implicit term (inv_alpha != 0) needs the policy's action probabilities pi1 and pi2")
    w1, w2 = step_weights if step_weights is not None else (None, None)
    q1, q2 = implicit_rewards if implicit_rewards is not None else (r1, r2)
    hyper = implicit_term(bce, q1, a1, pi1, q2, a2, pi2, inv_alpha, baseline, w1, w2)
    if pair_weights is not None:
        hyper = hyper * pair_weights.to(hyper.dtype)
    hyper_mean = implicit_scale * hyper.mean()
    return bce_mean + hyper_mean, bce_mean.detach(), hyper_mean.detach()


def sobirl_loss(
    r1: torch.Tensor,
    a1: torch.Tensor,
    pi1: torch.Tensor | None,
    r2: torch.Tensor,
    a2: torch.Tensor,
    pi2: torch.Tensor | None,
    y: torch.Tensor,
    inv_alpha: float,
    baseline: bool = False,
) -> torch.Tensor:
    """The SoBiRL upper-level surrogate loss for a batch of B preference pairs (the paper's estimator (78)).

    r1, r2: (B, H, A) per-action rewards of the fragments' observations (carrying gradient); a1, a2: (B, H) actions
    taken; pi1, pi2: (B, H, A) current-policy action probabilities (treated as constants; may be None when
    inv_alpha == 0); y: (B,) probability that fragment 1 is preferred; inv_alpha: 1/alpha, the implicit term's
    coefficient. inv_alpha = 0 gives DRLHF's loss, the mean Bradley-Terry cross-entropy, exactly.

    baseline=True (not in the paper) weights the implicit term by l minus the leave-one-out mean l of the other
    pairs: the same expected gradient on-policy (the score function has zero mean under pi), lower variance.
    """
    return sobirl_loss_terms(r1, a1, pi1, r2, a2, pi2, y, inv_alpha, baseline)[0]


# Which pairs the implicit term uses: all, or only those collected after the uniform-random phase.
IMPLICIT_PAIRS = ("all", "learned")


class SoBiRLLoss:
    """Bradley-Terry cross-entropy plus the implicit term (1/alpha coefficient) once global_step > hyper_start."""

    def __init__(
        self,
        hyper_start: int = 100_000,
        correction: str = "none",
        ratio_clip: float = 10.0,
        clamp_aware: bool = False,
        implicit_pairs: str = "all",
        learning_starts: int = 0,
        policy_probs=None,
    ):
        self.correction = parse_correction(correction)
        self.hyper_start = hyper_start
        self.ratio_clip = ratio_clip
        self.clamp_aware = clamp_aware
        self.implicit_pairs = implicit_pairs
        self.learning_starts = learning_starts
        self.policy_probs = policy_probs  # None: the learner's own (see agents/pipeline/losses.py)

    def needs_policy(self, global_step: int) -> bool:
        return global_step > self.hyper_start

    def __call__(self, x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.needs_policy(x.global_step):
            return x.bce.mean(), {"inv_alpha": torch.zeros(())}
        p = x.pairs
        inv_alpha = 1.0 / x.alpha
        metrics = {"inv_alpha": torch.tensor(inv_alpha)}
        step_weights = None
        if self.correction.ratios:
            taken = lambda pi, a: pi.gather(-1, a.long().unsqueeze(-1)).squeeze(-1)
            step_weights = (
                importance_weights(taken(x.pi1, p.actions1), p.behaviour1, self.ratio_clip),
                importance_weights(taken(x.pi2, p.actions2), p.behaviour2, self.ratio_clip),
            )
            weights = torch.cat(step_weights)
            metrics["ratio_mean"] = weights.mean()
            metrics["ratio_clipped"] = (weights >= self.ratio_clip).float().mean()
        learned = p.collected >= self.learning_starts if self.implicit_pairs == "learned" else None
        clamped = (x.r1.clamp(-1.0, 1.0), x.r2.clamp(-1.0, 1.0)) if self.clamp_aware else None
        loss, _, _ = sobirl_loss_terms(
            x.r1, p.actions1, x.pi1, x.r2, p.actions2, x.pi2, p.labels, inv_alpha, self.correction.baseline,
            step_weights=step_weights, pair_weights=learned, implicit_scale=x.policy_share, implicit_rewards=clamped,
        )  # fmt: skip
        return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# The algorithm: DRLHF's pipeline (agents/pipeline/learner.py) with the implicit term.


@dataclass
class Args(CorrectionArgs, PreferenceArgs):
    exp_name: str = flag("sobirl", "name of this experiment (part of the run name)")
    hyper_start: int = flag(
        100_000, "the implicit term is on once global_step exceeds this (the reference code's threshold); 0 before"
    )
    hyper_baseline: bool = flag(False, "the same as --implicit-correction baseline (kept for earlier commands)")
    implicit_pairs: str = flag(
        "all",
        "pairs the implicit term uses: all, or learned (not those gathered while actions were uniformly random)",
        choices=IMPLICIT_PAIRS,
    )
    clamp_aware: bool = flag(False, "differentiate the implicit term through the [-1, 1] clamp SAC applies to r")
    reference_pi_scale: bool = flag(
        False,
        "authors' code: the actor that supplies pi for the implicit term sees observations divided by 255 "
        "once more (nearly blank inputs); part of --reference-quirks",
    )

    RESUMABLE: ClassVar[frozenset[str]] = PreferenceArgs.RESUMABLE

    def __post_init__(self):
        super().__post_init__()
        if self.reference_quirks:
            self.reference_pi_scale = True
        if self.hyper_baseline and self.implicit_correction == "none":
            self.implicit_correction = "baseline"

    def validate(self) -> None:
        super().validate()
        require_non_negative(self, "hyper_start")


def make_loss(args: Args, trainer) -> SoBiRLLoss:
    policy = None
    if args.reference_pi_scale:
        # The actor divides by 255 itself; handing it float pixels already divided by 255 reproduces obs / 65025.
        policy = lambda obs: trainer.policy_probs(obs.float() / 255.0)
    return SoBiRLLoss(
        args.hyper_start,
        args.implicit_correction,
        args.ratio_clip,
        args.clamp_aware,
        args.implicit_pairs,
        args.learning_starts,
        policy,
    )


def main(argv: Sequence[str] | None = None) -> PreferenceLearner:
    return run_preference_rl(ALGO, Args, argv, make_loss, __doc__)


if __name__ == "__main__":
    run_cli(main)
