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

from agents.infra.cli import flag, flag_name, require, require_non_negative, run_cli
from agents.pipeline.corrections import CorrectionArgs, importance_weights, leave_one_out_baseline, parse_correction
from agents.pipeline.learner import PreferenceArgs, PreferenceLearner, run_preference_rl
from agents.pipeline.losses import POOLED, LossInputs, bradley_terry_bce, fragment_returns

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
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair surrogate (l - b) * (1/alpha) * (weighted advantage sums of both fragments), (B,), l a constant;
    b the leave-one-out baseline with `baseline`, else 0; w1, w2 optional per-step weights (B, H). `order`, a
    permutation of the pairs, gives pair i the cross-entropy of pair order[i] (the placebo: the same values of l, no
    link between a pair's fit and its fragments)."""
    weight = bce.detach() if order is None else bce.detach()[order]
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
    placebo_order: torch.Tensor | None = None,
    implicit_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean BCE, implicit term as it enters the loss); loss = mean BCE + implicit_scale * mean implicit term.
    See `sobirl_loss` for the arguments the paper's estimator takes; the keyword-only ones are what `SoBiRLLoss`'s
    flags add: per-step weights (w1, w2) (B, H) of the score terms (--implicit-correction ratio), a weight per pair
    (B,) (--implicit-pairs learned or latest: 0 for the pairs left out), the scale of the whole term (an ensemble
    member's policy share), the rewards the term differentiates (--clamp-aware: the clamped ones SAC sees) and the
    placebo's permutation of the pairs' cross-entropies (--implicit-placebo). With `implicit_grad` the third
    output keeps its gradient (for a loss that pools the term)."""
    bce = bradley_terry_bce(fragment_returns(r1, a1), fragment_returns(r2, a2), y)
    bce_mean = bce.mean()
    if inv_alpha == 0:
        return bce_mean, bce_mean.detach(), torch.zeros((), dtype=bce.dtype, device=bce.device)
    if pi1 is None or pi2 is None:
        raise ValueError("the implicit term (inv_alpha != 0) needs the policy's action probabilities pi1 and pi2")
    w1, w2 = step_weights if step_weights is not None else (None, None)
    q1, q2 = implicit_rewards if implicit_rewards is not None else (r1, r2)
    hyper = implicit_term(bce, q1, a1, pi1, q2, a2, pi2, inv_alpha, baseline, w1, w2, placebo_order)
    if pair_weights is not None:
        hyper = hyper * pair_weights.to(hyper.dtype)
    hyper_mean = implicit_scale * hyper.mean()
    return bce_mean + hyper_mean, bce_mean.detach(), hyper_mean if implicit_grad else hyper_mean.detach()


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


# Which pairs the implicit term uses: all; only those collected after the uniform-random phase; or only those
# collected within the latest `latest_window` env steps (the latest agent phase: the current policy's pairs).
IMPLICIT_PAIRS = ("all", "learned", "latest")


def selected_pairs(collected: torch.Tensor, mode: str, learning_starts: int, global_step: int, window: int):
    """The per-pair weight (1 or 0) of the implicit term, or None for every pair (`mode` "all")."""
    if mode == "learned":
        return collected >= learning_starts
    if mode == "latest":
        return collected >= global_step - window
    return None


class SoBiRLLoss:
    """Bradley-Terry cross-entropy plus the implicit term (1/alpha coefficient) once global_step > hyper_start.

    With `pooling` = (scale, cap) the implicit term is not stepped on per minibatch: it is returned as the POOLED
    metric, which the reward epoch averages over its minibatches and applies once, times `scale`, its norm capped at
    `cap` times that step's cross-entropy gradient (agents/pipeline/reward_training.py, GradientPool). With
    `placebo`, each minibatch's cross-entropies are shuffled among its pairs before they weight the term."""

    def __init__(
        self,
        hyper_start: int = 100_000,
        correction: str = "none",
        ratio_clip: float = 10.0,
        clamp_aware: bool = False,
        implicit_pairs: str = "all",
        learning_starts: int = 0,
        policy_probs=None,
        *,
        latest_window: int = 0,
        pooling: tuple[float, float] | None = None,
        placebo_generator: torch.Generator | None = None,
    ):
        self.correction = parse_correction(correction)
        self.hyper_start = hyper_start
        self.ratio_clip = ratio_clip
        self.clamp_aware = clamp_aware
        self.implicit_pairs = implicit_pairs
        self.learning_starts = learning_starts
        self.policy_probs = policy_probs  # None: the learner's own (see agents/pipeline/losses.py)
        self.latest_window = latest_window
        self.pooling = pooling
        self.placebo_generator = placebo_generator

    def state_dict(self) -> dict:
        """The placebo's generator (nothing without the placebo)."""
        return {} if self.placebo_generator is None else {"placebo_generator": self.placebo_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if self.placebo_generator is not None:
            self.placebo_generator.set_state(state["placebo_generator"].cpu())

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
        chosen = selected_pairs(p.collected, self.implicit_pairs, self.learning_starts, x.global_step,
                                self.latest_window)  # fmt: skip
        if chosen is not None:
            metrics["implicit_pairs_share"] = chosen.float().mean()
        clamped = (x.r1.clamp(-1.0, 1.0), x.r2.clamp(-1.0, 1.0)) if self.clamp_aware else None
        order = None
        if self.placebo_generator is not None:
            order = torch.randperm(len(p.labels), generator=self.placebo_generator).to(p.labels.device)
        loss, _, hyper_mean = sobirl_loss_terms(
            x.r1, p.actions1, x.pi1, x.r2, p.actions2, x.pi2, p.labels, inv_alpha, self.correction.baseline,
            step_weights=step_weights, pair_weights=chosen, implicit_scale=x.policy_share, implicit_rewards=clamped,
            placebo_order=order, implicit_grad=self.pooling is not None,
        )  # fmt: skip
        if self.pooling is not None:
            return x.bce.mean(), {**metrics, POOLED: hyper_mean}
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
    implicit_window: int = flag(
        0, "with --implicit-pairs latest: the env steps back from the current one whose pairs count (0: --inner-steps)"
    )
    implicit_pooling: bool = flag(
        False,
        "pool the implicit term over each reward epoch: its minibatch gradients are averaged and applied once, "
        "with the epoch's last step (logs reward/split_half_cosine, pooled_ratio, pooled_capped)",
    )
    implicit_scale: float = flag(1.0, "with --implicit-pooling: beta, the pooled implicit gradient's scale")
    implicit_cap: float = flag(
        0.0,
        "with --implicit-pooling: kappa, the pooled implicit gradient's norm is capped at kappa times the norm of "
        "the cross-entropy gradient of the step it joins (0: no cap)",
    )
    implicit_placebo: bool = flag(
        False,
        "the placebo control: each minibatch's cross-entropies are shuffled among its pairs before they weight the "
        "implicit term (the same values, no link between a pair's fit and its fragments)",
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
        require_non_negative(self, "hyper_start", "implicit_window", "implicit_scale", "implicit_cap")
        for name in ("implicit_scale", "implicit_cap"):
            changed = getattr(self, name) != getattr(type(self), name)
            require(self.implicit_pooling or not changed, f"{flag_name(name)} applies with --implicit-pooling only")
        require(
            self.implicit_pairs == "latest" or self.implicit_window == 0,
            "--implicit-window applies with --implicit-pairs latest only",
        )


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
        latest_window=args.implicit_window or args.inner_steps,
        pooling=(args.implicit_scale, args.implicit_cap) if args.implicit_pooling else None,
        placebo_generator=torch.Generator().manual_seed(args.seed + 67867967) if args.implicit_placebo else None,
    )


def main(argv: Sequence[str] | None = None) -> PreferenceLearner:
    return run_preference_rl(ALGO, Args, argv, make_loss, __doc__)


if __name__ == "__main__":
    run_cli(main)
