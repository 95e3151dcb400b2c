"""AIHF ("Learning reward and policy jointly from demonstration and preference improves alignment"): the reward
model fits the preference pairs and, at the same time, scores expert demonstrations above the agent's own play.

The pipeline is DRLHF's (agents/pipeline/learner.py); only the reward loss differs (`AIHFLoss`):

    loss = mean over pairs of BCE(sigmoid(R(tau1) - R(tau2)), y)                          (the paper's L2, BTL)
         + w1 * (mean over agent fragments of R(tau^A) - mean over demo fragments of R(tau^E))   (its L1)

with R(tau) = sum_{t<H} gamma^t r_phi(s_t, a_t) (`discounted_returns`). The loss is the negative of the objective
the paper ascends (its eq. 19). Demonstrations come from a file `sobirl/demos.py` records; agent fragments from the
latest rollouts. The demonstration term is linear in r and unbounded below, so w1 (--demo-weight) matters.

Specification, sign, scale of w1, and why demonstration and agent fragments share one BatchNorm pass:
docs/algorithms.md §8.3.

    python sobirl/demos.py record --checkpoint runs/<sac run> --steps 10000 --min-return 2 --out breakout_demos.npz
    python sobirl/beamrider.py --algo aihf --env-id MinAtar/Breakout-v1 --demos breakout_demos.npz
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from agents.feedback.demos import Demonstrations
from agents.feedback.pairs import fragment_observations
from agents.infra.cli import UsageError, flag, require, require_non_negative, run_cli
from agents.lower import sac
from agents.pipeline.learner import PreferenceArgs, PreferenceLearner, run_preference_rl
from agents.pipeline.losses import LossInputs, bradley_terry_bce, fragment_returns

ALGO = "aihf"

# (count, length, generator) -> (frames uint8 (count, length + stack - 1, *frame_shape), actions int64 (count, length))
FragmentSource = Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def discounted_returns(rewards: torch.Tensor, actions: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_t gamma^t r(s_t, a_t) per fragment: (B, H, A) per-action rewards and (B, H) actions -> (B,)."""
    if gamma == 1.0:
        return fragment_returns(rewards, actions)
    taken = rewards.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    discounts = gamma ** torch.arange(taken.shape[-1], device=taken.device, dtype=taken.dtype)
    return (taken * discounts).sum(-1)


class AIHFLoss:
    """Bradley-Terry cross-entropy on the pairs plus w1 (mean R(agent fragments) - mean R(demo fragments))."""

    policy_probs = None

    def __init__(
        self,
        demo_fragments: FragmentSource,
        agent_fragments: FragmentSource,
        fragment_length: int,
        batch: int,
        demo_weight: float = 1.0,
        gamma: float = 1.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.demo_fragments = demo_fragments
        self.agent_fragments = agent_fragments
        self.fragment_length = fragment_length
        self.batch = batch
        self.demo_weight = demo_weight
        self.gamma = gamma
        # Their own generators: the pairs, labels and SAC draw nothing differently because of this term.
        self.demo_generator = torch.Generator(device=device).manual_seed(seed + 86_028_121)
        self.agent_generator = torch.Generator(device=device).manual_seed(seed + 49_979_687)

    def needs_policy(self, global_step: int) -> bool:
        return False

    def __call__(self, x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x.model is None:
            raise ValueError("the AIHF loss scores demonstration and agent fragments: LossInputs.model is needed")
        p, gamma, length = x.pairs, self.gamma, self.fragment_length
        # The preference term with AIHF's return (with gamma = 1 it is the pipeline's cross-entropy as it stands).
        preference = (
            x.bce
            if gamma == 1.0
            else bradley_terry_bce(
                discounted_returns(x.r1, p.actions1, gamma), discounted_returns(x.r2, p.actions2, gamma), p.labels
            )
        )
        demo_frames, demo_actions = self.demo_fragments(self.batch, length, self.demo_generator)
        agent_frames, agent_actions = self.agent_fragments(self.batch, length, self.agent_generator)
        # One forward pass for both sets, so BatchNorm normalises them with the same statistics (algorithms.md §8.3).
        rewards = x.model(fragment_observations(torch.cat([demo_frames, agent_frames.to(demo_frames.device)]), length))
        demo_rewards, agent_rewards = rewards.view(2, self.batch, length, -1).unbind(0)
        demo_return = discounted_returns(demo_rewards, demo_actions, gamma).mean()
        agent_return = discounted_returns(agent_rewards, agent_actions.to(demo_actions.device), gamma).mean()
        # Descending w1 (R_A - R_E) ascends the paper's w1 (R_E - R_A): the sign of its estimator (19). The term is
        # the demonstrations' likelihood under the policy, which follows the ensemble's mean reward: an ensemble
        # member's share of it is policy_share (1/K), as for SoBiRL's implicit term.
        demo_term = x.policy_share * self.demo_weight * (agent_return - demo_return)
        preference_term = preference.mean()
        metrics = {
            "demo_return": demo_return.detach(),
            "agent_return": agent_return.detach(),
            "demo_term": demo_term.detach(),
            "preference_term": preference_term.detach(),
        }
        return preference_term + demo_term, metrics

    def state_dict(self) -> dict:
        return {"demo_generator": self.demo_generator.get_state(), "agent_generator": self.agent_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.demo_generator.set_state(state["demo_generator"].cpu())
        self.agent_generator.set_state(state["agent_generator"].cpu())


# ---------------------------------------------------------------------------------------------------------------
# The algorithm: DRLHF's pipeline with the demonstration term.


@dataclass
class Args(PreferenceArgs):
    exp_name: str = flag("aihf", "name of this experiment (part of the run name)")
    demos: str = flag("", "demonstrations file recorded on this --env-id by `python sobirl/demos.py record` (required)")
    demo_weight: float = flag(
        0.01,
        "w1, the weight of the demonstration term against the preference cross-entropy. The paper gives none for "
        "control tasks; 0.01 is the largest value of its ablation on a language model with a DPO-style objective. "
        "On MinAtar w1 = 1 and 0.1 let the term run away (docs/results/2026-11-22-minatar)",
    )
    discount_return: bool = flag(
        True,
        "fragment returns R = sum_t gamma^t r with SAC's --gamma, in both terms, as in the AIHF paper; "
        "--no-discount-return: the undiscounted sum DRLHF and SoBiRL use",
    )
    demo_batch: int = flag(
        0, "demonstration fragments, and as many agent fragments, per reward minibatch (0: --reward-batch-size)"
    )

    RESUMABLE: ClassVar[frozenset[str]] = PreferenceArgs.RESUMABLE

    def validate(self) -> None:
        super().validate()
        require(
            bool(self.demos),
            "--demos: AIHF needs a demonstrations file; record one with "
            "python sobirl/demos.py record --checkpoint RUN --steps N --out FILE",
        )
        require_non_negative(self, "demo_weight", "demo_batch")


def load_demonstrations(args: Args, trainer: sac.SACTrainer):
    """The --demos file, checked against this run's environment and fragment length, on the trainer's device."""
    demos = Demonstrations.load(args.demos, "--demos", env_id=args.env_id)
    replay = trainer.buffer
    if (demos.stack, demos.frame_shape, demos.num_actions) != (replay.stack, replay.frame_shape, trainer.num_actions):
        raise UsageError(
            f"--demos {args.demos}: frames {demos.frame_shape} x {demos.stack}, {demos.num_actions} actions; this "
            f"run's are {replay.frame_shape} x {replay.stack}, {trainer.num_actions} actions"
        )
    if demos.longest_game() < args.fragment_length:
        raise UsageError(
            f"--fragment-length {args.fragment_length}: no game in --demos {args.demos} is that long "
            f"(the longest has {demos.longest_game()} steps)"
        )
    return demos.to(trainer.device)


def make_loss(args: Args, trainer: sac.SACTrainer) -> AIHFLoss:
    demos = load_demonstrations(args, trainer)

    def demo_fragments(count: int, length: int, generator: torch.Generator):
        fragments = demos.fragments(count, length, generator)
        return fragments.frames, fragments.actions

    def agent_fragments(count: int, length: int, generator: torch.Generator):
        # The latest agent phase: the policy the reward has just shaped (pi^{k+1} of the paper's Algorithm 1).
        fragments = trainer.recent_fragments(count, length, args.inner_steps, generator)
        return fragments.frames, fragments.actions

    return AIHFLoss(
        demo_fragments,
        agent_fragments,
        args.fragment_length,
        args.demo_batch or args.reward_batch_size,
        args.demo_weight,
        args.gamma if args.discount_return else 1.0,
        args.seed,
        trainer.device,
    )


def main(argv: Sequence[str] | None = None) -> PreferenceLearner:
    return run_preference_rl(ALGO, Args, argv, make_loss, __doc__)


if __name__ == "__main__":
    run_cli(main)
